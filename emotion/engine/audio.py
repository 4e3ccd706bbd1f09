"""Bytes in, 16 kHz mono float32 out, with every limit checked before the work it guards."""

from __future__ import annotations

import io
import re

import numpy as np
import soundfile as sf
import soxr

from emotion.errors import AudioTooLarge, BadReference, DecodeFailed, InvalidAudio
from emotion.settings import FRAME_HOP_S, SAMPLE_RATE_HZ  # noqa: F401  (re-exported)

# Headerless telephony audio: what a caller must name, and how libsndfile reads it.
RAW_ENCODINGS = {"mulaw": "ULAW", "ulaw": "ULAW", "alaw": "ALAW", "pcm_s16le": "PCM_16"}


def decode_audio(
    data: bytes,
    *,
    encoding: str | None = None,
    sample_rate_hz: int | None = None,
    max_seconds: float = 300.0,
    min_seconds: float = 0.2,
    channel: int | None = None,
) -> np.ndarray:
    """Decode any container libsndfile reads (WAV, FLAC, OGG/Vorbis/Opus, MP3) or raw
    telephony audio, take one channel (``channel``, from 0) or the mix of all, and
    resample to 16 kHz mono float32."""
    if not data:
        raise InvalidAudio("audio is empty (0 bytes)")
    kwargs: dict = {}
    if encoding is not None:
        subtype = RAW_ENCODINGS.get(encoding.lower())
        if subtype is None:
            raise BadReference(f"unknown encoding {encoding!r}: expected one of {', '.join(sorted(RAW_ENCODINGS))}")
        if not sample_rate_hz or not (1000 <= int(sample_rate_hz) <= 192_000):
            raise BadReference(f"headerless {encoding} audio needs sample_rate in [1000, 192000], got {sample_rate_hz!r}")
        kwargs = {"format": "RAW", "subtype": subtype, "samplerate": int(sample_rate_hz), "channels": 1}
    try:
        with sf.SoundFile(io.BytesIO(data), **kwargs) as f:
            rate, frames, channels = f.samplerate, f.frames, f.channels
            if rate <= 0 or channels <= 0:
                raise DecodeFailed(f"audio header is invalid ({rate} Hz, {channels} channels)")
            # Checked from the header, so an hour-long file is refused without decoding it.
            if frames / rate > max_seconds:
                raise AudioTooLarge(f"audio is {frames / rate:.1f} s long; the limit is {max_seconds:g} s")
            samples = f.read(frames=int(max_seconds * rate) + 1, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise DecodeFailed(f"could not decode audio: {_first_line(exc)}") from exc
    if samples.shape[0] / rate > max_seconds:
        raise AudioTooLarge(f"audio is longer than the {max_seconds:g} s limit")
    if samples.size == 0:
        raise InvalidAudio("audio holds no samples")
    if channel is not None and channel >= channels:
        raise BadReference(f"channel {channel} asked for; the audio has {channels} channel{'s' if channels > 1 else ''} (0 to {channels - 1})")
    # Call recorders put the caller on one channel and the agent on the other: mixing them
    # would hear the agent in the caller's emotion, so a stereo call names its channel.
    mono = samples[:, channel] if channel is not None else samples.mean(axis=1)
    if not np.isfinite(mono).all():
        raise InvalidAudio("audio holds NaN or infinite samples")
    if rate != SAMPLE_RATE_HZ:
        mono = soxr.resample(mono, rate, SAMPLE_RATE_HZ, quality="HQ")
    if len(mono) < min_seconds * SAMPLE_RATE_HZ:
        raise InvalidAudio(f"audio is {len(mono) / SAMPLE_RATE_HZ * 1000:.0f} ms long; at least {min_seconds * 1000:.0f} ms is needed")
    return np.ascontiguousarray(mono, dtype=np.float32)


def encode_audio(wave: np.ndarray, sample_rate_hz: int, fmt: str, subtype: str | None = None) -> bytes:
    """Encode with libsndfile (e.g. "WAV"/"PCM_16", "RAW"/"ULAW"): what callers, benchmarks and tests send."""
    buf = io.BytesIO()
    sf.write(buf, wave, sample_rate_hz, format=fmt, subtype=subtype)
    return buf.getvalue()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    # libsndfile names the in-memory file object; the caller knows which turn it was.
    text = re.sub(r"^Error opening <[^>]*>: ", "", text.splitlines()[0])
    return text[:200]
