"""Bytes in, 16 kHz mono float32 out, with every limit checked before the work it guards."""

from __future__ import annotations

import io
import re
import time

import numpy as np
import soundfile as sf
import soxr

from emotion.errors import AudioTooLarge, BadReference, DecodeFailed, InvalidAudio, TimedOut
from emotion.settings import FRAME_HOP_S, SAMPLE_RATE_HZ  # noqa: F401  (re-exported)

# Headerless telephony audio: what a caller must name, and how libsndfile reads it.
RAW_ENCODINGS = {"mulaw": "ULAW", "ulaw": "ULAW", "alaw": "ALAW", "pcm_s16le": "PCM_16"}

# Refused from the header, before a sample is decoded: decoded whole, a 1.7 MB FLAC of 300 s
# at 655,350 Hz over 8 channels asked for 5.9 GiB, a 7 KB Ogg Vorbis file of 255 channels
# for 127 MB. Call recordings are mono or one channel per party, and 8 channels hold a
# conference bridge's tracks; call audio is 8 to 48 kHz, and 192 kHz is as high as
# recorders go.
MAX_CHANNELS = 8
MAX_SAMPLE_RATE_HZ = 192_000
# Samples (frames × channels) per second of the duration cap: the most work a turn may ask
# of the decoder. 384,000 admits a turn as long as the cap in 192 kHz stereo or in 48 kHz
# over 8 channels; as long in 96 kHz over 8 channels is refused.
MAX_SAMPLES_PER_SECOND = 2 * MAX_SAMPLE_RATE_HZ
# Decoded a block at a time (about 64k frames × channels samples, 256 KiB as float32),
# down-mixed and resampled as it goes: what a turn holds is its 16 kHz output, whatever the
# input's layout. Blocks are whole MPEG frames (1,152 samples; 576 at 24 kHz and below):
# libsndfile's MP3 decoder, read across a frame's end, returns samples off by up to 0.2 at
# the next read.
BLOCK_SAMPLES = 1 << 16
_MPEG_FRAME = 1152
# What libsndfile reports when the header does not give the length (a FLAC written as a live
# stream). soundfile seeks after every read and libsndfile cannot seek such a stream, so it
# is refused as before, with a message that says so rather than a length of 2^63 frames.
_UNKNOWN_FRAMES = 2**63 - 1


def decode_audio(
    data: bytes,
    *,
    encoding: str | None = None,
    sample_rate_hz: int | None = None,
    max_seconds: float = 300.0,
    min_seconds: float = 0.2,
    channel: int | None = None,
    deadline: float | None = None,
) -> np.ndarray:
    """Decode any container libsndfile reads (WAV, FLAC, OGG/Vorbis/Opus, MP3) or raw
    telephony audio, take one channel (``channel``, from 0) or the mix of all, and
    resample to 16 kHz mono float32. Past ``deadline`` (a ``time.monotonic()`` value) the
    decoding stops between blocks with ``TimedOut``."""
    if not data:
        raise InvalidAudio("audio is empty (0 bytes)")
    kwargs: dict = {}
    if encoding is not None:
        subtype = RAW_ENCODINGS.get(encoding.lower())
        if subtype is None:
            raise BadReference(f"unknown encoding {encoding!r}: expected one of {', '.join(sorted(RAW_ENCODINGS))}")
        if not sample_rate_hz or not (1000 <= int(sample_rate_hz) <= MAX_SAMPLE_RATE_HZ):
            raise BadReference(f"headerless {encoding} audio needs sample_rate in [1000, {MAX_SAMPLE_RATE_HZ}], "
                               f"got {sample_rate_hz!r}")
        kwargs = {"format": "RAW", "subtype": subtype, "samplerate": int(sample_rate_hz), "channels": 1}
    try:
        with sf.SoundFile(io.BytesIO(data), **kwargs) as f:
            max_frames = _check_header(f.samplerate, f.channels, f.frames, max_seconds, channel)
            mono = _read_mono(f, max_frames, max_seconds, channel, deadline)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise DecodeFailed(f"could not decode audio: {_first_line(exc)}") from exc
    except MemoryError:
        # Within the caps a turn needs its output and a block (20 MB for 300 s); a process
        # that cannot find them refuses this turn rather than failing the request.
        raise AudioTooLarge("audio needs more memory to decode than the process has free") from None
    if len(mono) < min_seconds * SAMPLE_RATE_HZ:
        raise InvalidAudio(f"audio is {len(mono) / SAMPLE_RATE_HZ * 1000:.0f} ms long; at least {min_seconds * 1000:.0f} ms is needed")
    return mono


def channel_count(data: bytes, encoding: str | None = None) -> int | None:
    """How many channels the audio's header declares (1 for headerless audio), or ``None``
    where the header does not read; nothing is decoded. The review page offers one channel
    at a time of a recording that has several."""
    if encoding is not None:
        return 1
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            return int(f.channels)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError):
        return None


def _check_header(rate: int, channels: int, frames: int, max_seconds: float, channel: int | None) -> int:
    """Refuse what the header says is over a cap; return how many frames may be read."""
    if rate <= 0 or channels <= 0:
        raise DecodeFailed(f"audio header is invalid ({rate} Hz, {channels} channels)")
    if channels > MAX_CHANNELS:
        raise AudioTooLarge(f"audio has {channels} channels; the limit is {MAX_CHANNELS}")
    if rate > MAX_SAMPLE_RATE_HZ:
        raise AudioTooLarge(f"audio is sampled at {rate} Hz; the limit is {MAX_SAMPLE_RATE_HZ} Hz")
    if channel is not None and channel >= channels:
        raise BadReference(f"channel {channel} asked for; the audio has {channels} channel{'s' if channels > 1 else ''} (0 to {channels - 1})")
    if frames == _UNKNOWN_FRAMES:
        raise DecodeFailed("audio header does not give its length (a stream written without one)")
    # Checked from the header, so an hour-long file is refused without decoding it.
    if frames / rate > max_seconds:
        raise AudioTooLarge(f"audio is {frames / rate:.1f} s long; the limit is {max_seconds:g} s")
    max_samples = int(max_seconds * MAX_SAMPLES_PER_SECOND)
    if frames * channels > max_samples:
        raise AudioTooLarge(f"audio holds {frames * channels:,} samples ({frames / rate:.1f} s over {channels} channels "
                            f"at {rate} Hz); the limit is {max_samples:,} ({max_seconds:g} s at "
                            f"{MAX_SAMPLES_PER_SECOND:,} samples a second)")
    # The read stops at the same caps, should a decoder ever read past its header's length.
    return min(int(max_seconds * rate), max_samples // channels)


def _read_mono(f: sf.SoundFile, max_frames: int, max_seconds: float, channel: int | None, deadline: float | None) -> np.ndarray:
    rate, channels = f.samplerate, f.channels
    block = np.empty((max(1, BLOCK_SAMPLES // channels // _MPEG_FRAME) * _MPEG_FRAME, channels), dtype=np.float32)
    # soxr's stream gives the one-shot resample's samples (tests/test_audio.py checks it).
    resampler = soxr.ResampleStream(rate, SAMPLE_RATE_HZ, 1, dtype="float32", quality="HQ") if rate != SAMPLE_RATE_HZ else None
    # The output is written in place, sized from the header: a turn's peak is its output
    # once, not a list of pieces and their concatenation. Pages a short read leaves
    # untouched are never resident.
    wave = np.empty(int(np.ceil(min(f.frames, max_frames) * SAMPLE_RATE_HZ / rate)) + 64, dtype=np.float32)
    read = filled = 0
    while True:
        if deadline is not None and time.monotonic() > deadline:
            raise TimedOut(f"decoding ran past its time limit after {read / rate:.1f} s of audio")
        # One frame past the cap tells a header that lied about the length from one that did not.
        samples = f.read(dtype="float32", always_2d=True, out=block[: min(len(block), max_frames + 1 - read)])
        last = not len(samples)
        if not last:
            read += len(samples)
            if read > max_frames:
                if read > max_seconds * rate:
                    raise AudioTooLarge(f"audio is longer than the {max_seconds:g} s limit")
                raise AudioTooLarge(f"audio holds more than {max_frames * channels:,} samples, the limit for {max_seconds:g} s")
            # Call recorders put the caller on one channel and the agent on the other: mixing them
            # would hear the agent in the caller's emotion, so a stereo call names its channel.
            mono = samples[:, channel or 0] if channel is not None or channels == 1 else samples.mean(axis=1)
            if not np.isfinite(mono).all():
                raise InvalidAudio("audio holds NaN or infinite samples")
        elif read == 0:
            raise InvalidAudio("audio holds no samples")
        else:
            mono = np.empty(0, dtype=np.float32)  # flushes the resampler
        piece = mono if resampler is None else resampler.resample_chunk(np.ascontiguousarray(mono), last=last)
        if filled + len(piece) > len(wave):  # more than the header said: libsndfile stops there, but grow all the same
            wave = np.concatenate([wave[:filled], np.empty(max(len(piece), len(wave) // 2), dtype=np.float32)])
        wave[filled : filled + len(piece)] = piece
        filled += len(piece)
        if last:
            return wave[:filled]


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
