"""Batch runs over files for QA and post-call analytics: results in order, CSV rows, ``.npy`` embeddings."""

from __future__ import annotations

import contextlib
import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emotion.engine.results import EmotionResult
from emotion.errors import ConfigError, EmotionError, FetchFailed
from emotion.tools.console import Progress, library_output_held


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


# What the decoder reads from the file's own header (libsndfile): a folder argument gives its
# files with these suffixes. Headerless audio (mu-law, A-law, PCM) needs --encoding and is
# named file by file.
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3")


@dataclass(frozen=True)
class InputFile:
    path: str  # as read, printed and written in the CSV
    name: str  # below --embeddings-out: its path inside the folder argument, or as given


def input_files(arguments: list[str]) -> list[InputFile]:
    """Each argument as it is, or, for a folder, the audio files under it (recursively, sorted
    by path, hidden files and folders skipped)."""
    found = []
    for argument in arguments:
        folder = Path(argument)
        if not folder.is_dir():
            given = Path(os.path.normpath(argument))
            # A relative path inside the current folder keeps its folders (a/call.wav and
            # b/call.wav stay apart); any other path gives its file name.
            inside = not given.is_absolute() and given.parts[:1] != ("..",)
            found.append(InputFile(argument, given.as_posix() if inside else given.name))
            continue
        audio = sorted(
            (p.relative_to(folder) for p in folder.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file()),
            key=lambda rel: rel.parts,
        )
        audio = [rel for rel in audio if not any(part.startswith(".") for part in rel.parts)]
        if not audio:
            raise FetchFailed(f"{argument}: no audio files under this folder (looked for {', '.join(AUDIO_SUFFIXES)}; "
                              "name headerless audio file by file, with --encoding)")
        found += [InputFile(str(folder / rel), rel.as_posix()) for rel in audio]
    return found


def embedding_paths(directory: str, inputs: list[InputFile]) -> list[Path]:
    """DIR/NAME.npy for each input, NAME keeping its suffix (call.wav.npy, call.mp3.npy); two
    different files that would share one are refused before anything is analysed."""
    paths, owner = [], {}
    for item in inputs:
        path = Path(directory) / (item.name + ".npy")
        first = owner.setdefault(path, item.path)
        if os.path.abspath(first) != os.path.abspath(item.path):
            raise ConfigError(f"--embeddings-out: {first} and {item.path} would both be written to {path}; "
                              "pass the folder that holds them, and their paths inside it keep them apart")
        paths.append(path)
    return paths


def save_embeddings(path: Path, result: EmotionResult) -> Path:
    """The utterance embedding (dim,), or the frame embeddings (frames, dim), as ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = result.frame_embeddings if result.frame_embeddings is not None else result.embedding
    np.save(path, array)
    return path


FILES_PER_BATCH = 64  # decoded audio held at once on a GPU; on CPU the engine runs a clip at a time


def analyze_files(engine, files: list[str], *, encoding=None, sample_rate=None, channel=None, granularity="utterance",
                  embeddings=False, progress: Progress | None = None, hold_library_output: bool = True):
    """Yield ``(file, EmotionResult)`` or ``(file, {"code", "message"})`` per file, in order;
    a bad file is reported and the run goes on.

    Files go through as many at a time as the engine runs in one batch (one on CPU, up to
    ``FILES_PER_BATCH`` on a GPU), so results and the bar come file by file, not per 64."""
    progress = progress or Progress(len(files), enabled=False)
    start = 0
    while start < len(files):
        size = min(engine.backend.max_batch_size, FILES_PER_BATCH) if engine.backend.model is not None else 1
        chunk = files[start : start + size]
        start += len(chunk)
        answers: list = [None] * len(chunk)
        waves = {}
        for i, name in enumerate(chunk):
            try:
                waves[i] = engine.decode_sync(Path(name).read_bytes(), encoding, sample_rate, channel)
            except OSError as exc:
                answers[i] = {"code": "fetch_failed", "message": f"cannot read file: {exc.strerror or exc}"}
            except EmotionError as exc:
                answers[i] = exc.as_dict()
        if waves and engine.backend.model is None:  # only once a file decodes
            with progress.loading(engine.settings.model), library_output_held() if hold_library_output else contextlib.nullcontext():
                engine.backend.load()
        if waves:
            for i, result in zip(waves, engine.analyze_waves(list(waves.values()), granularity=granularity, embeddings=embeddings)):
                answers[i] = result.as_dict() if isinstance(result, EmotionError) else result
        for name, answer in zip(chunk, answers):
            progress.advance()
            yield name, answer
