"""Peak memory of decoding one turn: normal calls, the decoding bombs, the largest turn the caps admit.

Each file is decoded in a fresh process; the figure is the rise of its resident set
(VmHWM after the decode minus VmRSS before, the high-water mark reset in between) and the
peak of what tracemalloc sees (numpy's buffers, not libsndfile's own).

    python bench/decode_memory.py [--cache DIR]

The 300 s FLAC bomb takes ~20 s to encode; ``--cache`` keeps the files between runs.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import speech_like  # noqa: E402

_CHILD = r"""
import json, sys, tracemalloc
from pathlib import Path
from emotion.engine.audio import decode_audio
from emotion.errors import EmotionError

def status(key):
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key + ":"))
    return int(line.split()[1]) / 1024

data, kwargs, traced = Path(sys.argv[1]).read_bytes(), json.loads(sys.argv[2]), sys.argv[3] == "1"
Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
before = status("VmRSS")
if traced:
    tracemalloc.start()
try:
    outcome = f"{len(decode_audio(data, **kwargs)) / 16000:g} s at 16 kHz"
except EmotionError as exc:
    outcome = f"{exc.code}: {exc.message}"
peak = tracemalloc.get_traced_memory()[1] / 2**20 if traced else None
print(json.dumps({"rss_mb": status("VmHWM") - before, "traced_mb": peak, "outcome": outcome}))
"""


def _encode(wave: np.ndarray, rate: int, fmt: str, subtype: str | None = None, block_s: float = 10.0) -> bytes:
    """Encode block by block, so an hour of 8 channels never sits in memory here either."""
    channels = 1 if wave.ndim == 1 else wave.shape[1]
    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", rate, channels, format=fmt, subtype=subtype) as f:
        for start in range(0, len(wave), int(block_s * rate)):
            f.write(wave[start : start + int(block_s * rate)])
    return buf.getvalue()


def _silence(seconds: float, rate: int, channels: int) -> np.ndarray:
    # A read-only broadcast view: no memory however long.
    return np.broadcast_to(np.zeros(1, np.float32), (int(seconds * rate), channels))


CASES = {
    "60 s WAV, 16 kHz mono": lambda: _encode(speech_like(60.0), 16000, "WAV", "PCM_16"),
    "60 s WAV, 8 kHz stereo call, channel 0": lambda: _encode(
        np.stack([speech_like(60.0, 8000, 1), speech_like(60.0, 8000, 2)], axis=1), 8000, "WAV", "PCM_16"),
    "60 s WAV, 44.1 kHz stereo, mixed": lambda: _encode(
        np.stack([speech_like(60.0, 44100, 1), speech_like(60.0, 44100, 2)], axis=1), 44100, "WAV", "PCM_16"),
    "300 s FLAC, 48 kHz, 8 ch (the most the caps admit)": lambda: _encode(_silence(300, 48000, 8), 48000, "FLAC"),
    "300 s FLAC, 192 kHz stereo (the most the caps admit)": lambda: _encode(_silence(300, 192000, 2), 192000, "FLAC"),
    "bomb: 60 s FLAC, 655,350 Hz, 8 ch": lambda: _encode(_silence(60, 655350, 8), 655350, "FLAC"),
    "bomb: 300 s FLAC, 655,350 Hz, 8 ch": lambda: _encode(_silence(300, 655350, 8), 655350, "FLAC"),
    "bomb: 2 s Ogg Vorbis, 255 ch": lambda: _encode(_silence(2, 16000, 255), 16000, "OGG", "VORBIS"),
}
KWARGS = {"60 s WAV, 8 kHz stereo call, channel 0": {"channel": 0}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, help="directory that keeps the generated files between runs")
    args = parser.parse_args()
    if args.cache is None:
        with tempfile.TemporaryDirectory(prefix="decode-memory-") as tmp:
            return measure(Path(tmp))
    args.cache.mkdir(parents=True, exist_ok=True)
    measure(args.cache)


def measure(cache: Path) -> None:
    print("| file | bytes | peak RSS rise | peak traced | outcome |\n|---|---:|---:|---:|---|")
    for i, (name, make) in enumerate(CASES.items()):
        path = cache / f"case{i}.audio"
        if not path.exists():
            path.write_bytes(make())
        kwargs = json.dumps(KWARGS.get(name, {}))
        run = [sys.executable, "-c", _CHILD, str(path), kwargs]
        rss = json.loads(subprocess.run([*run, "0"], cwd=ROOT, capture_output=True, text=True, check=True).stdout)
        traced = json.loads(subprocess.run([*run, "1"], cwd=ROOT, capture_output=True, text=True, check=True).stdout)
        print(f"| {name} | {path.stat().st_size:,} | {rss['rss_mb']:.1f} MB | {traced['traced_mb']:.1f} MB | {rss['outcome']} |",
              flush=True)


if __name__ == "__main__":
    main()
