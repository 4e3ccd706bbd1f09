"""Batch runs over files for QA and post-call analytics: results in order, CSV rows, ``.npy`` embeddings."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np

from emotion.engine.results import EmotionResult
from emotion.errors import EmotionError


class CsvWriter:
    """One row per file, or per segment; a file that failed gets a row with its error."""

    def __init__(self, path: str | None, labels: list[str], *, segments: bool) -> None:
        self.path, self.labels, self.segments = path, labels, segments
        self._file = self._writer = None

    def __enter__(self) -> CsvWriter:
        if self.path:
            self._file = open(self.path, "w", newline="", encoding="utf-8")  # noqa: SIM115
            timing = ["start_s", "end_s"] if self.segments else []
            self._writer = csv.writer(self._file)
            self._writer.writerow(["file", *timing, "emotion", "confidence", *self.labels, "duration_s", "error"])
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()

    def write(self, name: str, result: EmotionResult | dict) -> None:
        if self._writer is None:
            return
        if isinstance(result, dict):
            blanks = [""] * (len(self.labels) + (5 if self.segments else 3))
            self._writer.writerow([name, *blanks, f"[{result['code']}] {result['message']}"])
            return
        parts = result.segments if self.segments else [result]
        for part in parts:
            timing = [round(part.start_s, 3), round(part.end_s, 3)] if self.segments else []
            scores = [round(part.scores[label], 6) for label in self.labels]
            self._writer.writerow([name, *timing, part.emotion, round(part.confidence, 6), *scores, round(result.duration_s, 3), ""])


def save_embeddings(directory: str, name: str, result: EmotionResult) -> Path:
    """DIR/NAME.npy: the utterance embedding (dim,), or the frame embeddings (frames, dim)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    path = out / (Path(name).stem + ".npy")
    array = result.frame_embeddings if result.frame_embeddings is not None else result.embedding
    np.save(path, array)
    return path


FILES_PER_BATCH = 64  # decoded audio held at once; large runs go through in such chunks


def analyze_files(engine, files: list[str], *, encoding=None, sample_rate=None, channel=None, granularity="utterance",
                  embeddings=False, progress=False):
    """Yield ``(file, EmotionResult)`` or ``(file, {"code", "message"})`` per file, in order;
    a bad file is reported and the run goes on."""
    from tqdm import tqdm

    bar = tqdm(total=len(files), unit="file", disable=not (progress and sys.stderr.isatty()), file=sys.stderr)
    for start in range(0, len(files), FILES_PER_BATCH):
        chunk = files[start : start + FILES_PER_BATCH]
        answers: dict = {}
        waves = {}
        for name in chunk:
            try:
                waves[name] = engine.decode_sync(Path(name).read_bytes(), encoding, sample_rate, channel)
            except OSError as exc:
                answers[name] = {"code": "fetch_failed", "message": f"cannot read file: {exc.strerror}"}
            except EmotionError as exc:
                answers[name] = exc.as_dict()
        if waves:  # the model loads at the first batch: only once a file decodes
            for name, result in zip(waves, engine.analyze_waves(list(waves.values()), granularity=granularity, embeddings=embeddings)):
                answers[name] = result.as_dict() if isinstance(result, EmotionError) else result
        for name in chunk:
            bar.update()
            yield name, answers[name]
    bar.close()
