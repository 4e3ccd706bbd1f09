"""Decoding real encoded files of every supported kind, and refusing malformed ones."""

import functools
import io
import struct
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import soundfile as sf
import soxr
from conftest import ROOT, encode, speech_like
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emotion.engine import audio
from emotion.engine.audio import decode_audio
from emotion.errors import AudioTooLarge, BadReference, DecodeFailed, EmotionError, InvalidAudio, TimedOut

FORMATS = [
    ("WAV", "PCM_U8", 16000),
    ("WAV", "PCM_16", 16000),
    ("WAV", "PCM_24", 44100),
    ("WAV", "PCM_32", 48000),
    ("WAV", "FLOAT", 22050),
    ("WAV", "ULAW", 8000),
    ("WAV", "ALAW", 8000),
    ("FLAC", "PCM_16", 44100),
    ("OGG", "VORBIS", 32000),
    ("OGG", "OPUS", 48000),
    ("MP3", "MPEG_LAYER_III", 24000),
]


@pytest.mark.parametrize("fmt,subtype,sr", FORMATS)
@pytest.mark.parametrize("channels", [1, 2])
def test_every_container_decodes_to_16k_mono(fmt, subtype, sr, channels):
    wave = speech_like(1.5, sr)
    data = encode(np.stack([wave] * channels, axis=1) if channels == 2 else wave, sr, fmt, subtype)
    out = decode_audio(data)
    assert out.dtype == np.float32 and out.ndim == 1
    # Lossy codecs add encoder delay and padding; the duration stays within 100 ms.
    assert abs(len(out) / 16000 - 1.5) < 0.1
    # The signal survives: it correlates with the original resampled to 16 kHz.
    assert np.abs(out).max() > 0.05


def test_resampling_keeps_the_waveform():
    wave = speech_like(1.0, 8000)
    out = decode_audio(encode(wave, 8000, "WAV", "FLOAT"))
    assert len(out) == 16000
    # Every other sample of the 16 kHz output lines up with the 8 kHz input.
    assert np.corrcoef(out[::2][100:-100], wave[100:-100])[0, 1] > 0.99


@pytest.mark.parametrize("encoding,subtype", [("mulaw", "ULAW"), ("alaw", "ALAW"), ("pcm_s16le", "PCM_16")])
def test_headerless_telephony_audio(encoding, subtype):
    wave = speech_like(2.0, 8000)
    raw = encode(wave, 8000, "RAW", subtype)
    out = decode_audio(raw, encoding=encoding, sample_rate_hz=8000)
    assert len(out) == 32000
    assert np.corrcoef(out[::2][200:-200], wave[200:-200])[0, 1] > 0.98


def test_headerless_audio_needs_its_rate():
    with pytest.raises(BadReference, match="sample_rate"):
        decode_audio(b"\x00" * 8000, encoding="mulaw")
    with pytest.raises(BadReference, match="unknown encoding"):
        decode_audio(b"\x00" * 8000, encoding="gsm", sample_rate_hz=8000)


def _wav_header_claiming(data_bytes: int) -> bytes:
    return (b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, 16000, 32000, 2, 16)
            + b"data" + struct.pack("<I", data_bytes))


BAD_INPUTS = {
    "empty": (b"", InvalidAudio, "empty"),
    "header only": (_wav_header_claiming(0), InvalidAudio, "no samples"),
    "random bytes": (np.random.default_rng(0).bytes(4000), DecodeFailed, "could not decode"),
    "text": (b"hello, this is not audio at all\n" * 20, DecodeFailed, "could not decode"),
    "truncated flac": (encode(speech_like(2.0), 16000, "FLAC")[:300], (DecodeFailed, InvalidAudio), None),
    "10 ms": (encode(speech_like(0.01), 16000, "WAV", "PCM_16"), InvalidAudio, "too short|at least"),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_malformed_audio_gets_a_clear_error(name):
    data, error, message = BAD_INPUTS[name]
    with pytest.raises(error, match=message):
        decode_audio(data)


def test_header_claiming_gigabytes_is_read_only_as_far_as_it_goes():
    data = _wav_header_claiming(4_000_000_000) + encode(speech_like(1.0), 16000, "RAW", "PCM_16")
    out = decode_audio(data, max_seconds=300)
    assert abs(len(out) - 16000) < 10


def test_an_hour_of_silence_is_refused_from_its_header():
    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", 16000, 1, format="FLAC", subtype="PCM_16") as f:
        block = np.zeros(16000 * 60, dtype=np.int16)
        for _ in range(60):
            f.write(block)
    data = buf.getvalue()
    assert len(data) < 2_000_000  # small on the wire, an hour long
    # With its deadline already past, a decoder that read a single block would say timeout.
    with pytest.raises(AudioTooLarge, match="3600.0 s long"):
        decode_audio(data, max_seconds=300, deadline=time.monotonic() - 1)


def test_non_finite_samples_are_refused():
    wave = speech_like(1.0)
    wave[100] = np.nan
    wave[200] = np.inf
    with pytest.raises(InvalidAudio, match="NaN or infinite"):
        decode_audio(encode(wave, 16000, "WAV", "FLOAT"))


def test_silence_and_clipping_decode():
    assert np.all(decode_audio(encode(np.zeros(16000, np.float32), 16000, "WAV", "PCM_16")) == 0)
    loud = np.clip(speech_like(1.0) * 50, -1, 1)
    assert np.abs(decode_audio(encode(loud, 16000, "WAV", "PCM_16"))).max() > 0.99


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096), st.sampled_from([None, "mulaw", "pcm_s16le"]))
def test_arbitrary_bytes_never_crash_the_decoder(data, encoding):
    try:
        out = decode_audio(data, encoding=encoding, sample_rate_hz=8000 if encoding else None, min_seconds=0.0)
    except EmotionError:
        return
    assert out.dtype == np.float32 and np.isfinite(out).all()


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=1, max_size=2048), st.integers(0, 40))
def test_corrupted_wav_never_crashes_the_decoder(noise, offset):
    data = bytearray(encode(speech_like(0.3), 16000, "WAV", "PCM_16"))
    data[offset : offset + len(noise)] = noise
    try:
        decode_audio(bytes(data), min_seconds=0.0)
    except EmotionError:
        pass


def test_one_channel_of_a_stereo_call():
    """Caller on the left, agent on the right: the caller's channel alone, or the mix."""
    caller, agent = speech_like(2.0, seed=1), speech_like(2.0, seed=2) * 0.5
    stereo = encode(np.stack([caller, agent], axis=1), 16000, "WAV", "FLOAT")
    assert np.allclose(decode_audio(stereo, channel=0), caller, atol=1e-6)
    assert np.allclose(decode_audio(stereo, channel=1), agent, atol=1e-6)
    assert np.allclose(decode_audio(stereo), (caller + agent) / 2, atol=1e-6)
    with pytest.raises(BadReference, match=r"channel 2 asked for; the audio has 2 channels \(0 to 1\)"):
        decode_audio(stereo, channel=2)
    with pytest.raises(BadReference, match="the audio has 1 channel "):
        decode_audio(encode(caller, 16000, "WAV", "PCM_16"), channel=1)


# -- block by block: the same result as decoding whole -------------------------------


@functools.cache
def _voices(seconds: float, rate: int, channels: int) -> bytes:
    wave = np.stack([speech_like(seconds, rate, seed=i) for i in range(channels)], axis=1)
    return encode(wave[: len(wave) - 7], rate, "WAV", "FLOAT")  # the odd length leaves a partial last block


@pytest.mark.parametrize("block_samples", [4096, audio.BLOCK_SAMPLES])
@pytest.mark.parametrize("rate", [8000, 16000, 44100, 192000])
@pytest.mark.parametrize("channels,channel", [(1, None), (2, None), (2, 1), (8, None), (8, 5)])
def test_decoding_in_blocks_matches_decoding_whole(rate, channels, channel, block_samples, monkeypatch):
    """Read whole, mixed (or picked), resampled in one shot with soxr "HQ": what the decoder
    did before it streamed."""
    monkeypatch.setattr(audio, "BLOCK_SAMPLES", block_samples)
    data = _voices(4.5 if channels == 1 else 1.2, rate, channels)  # 4.5 s: past two default blocks at 16 kHz
    whole, _ = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    mono = whole[:, channel] if channel is not None else whole.mean(axis=1)
    expected = soxr.resample(mono, rate, 16000, quality="HQ") if rate != 16000 else mono
    out = decode_audio(data, channel=channel)
    assert out.dtype == np.float32 and len(out) == len(expected)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)


def test_mp3_read_in_blocks_matches_reading_it_whole():
    """libsndfile's MP3 decoder, read across an MPEG frame's end, returned samples off by up
    to 0.2 at the next read; blocks of whole frames read as the whole file does."""
    data = encode(speech_like(20.0, 24000), 24000, "MP3", "MPEG_LAYER_III")
    whole, _ = sf.read(io.BytesIO(data), dtype="float32")
    np.testing.assert_allclose(decode_audio(data), soxr.resample(whole, 24000, 16000, quality="HQ"), rtol=0, atol=1e-6)


# -- decoding bombs: small on the wire, huge decoded -----------------------------------


def _claiming(data: bytes, frames: int) -> bytes:
    """A FLAC whose STREAMINFO claims ``frames`` (0: unknown). Decoders trust the claim;
    patching it gives the 300 s bomb's header without the 20 s it takes to encode."""
    data = bytearray(data)
    # "fLaC", a 4-byte block header, 10 bytes of block and frame sizes, then 64 bits:
    # rate (20), channels - 1 (3), bits - 1 (5), total frames (36).
    packed = int.from_bytes(data[18:26], "big")
    data[18:26] = (packed & ~(2**36 - 1) | frames).to_bytes(8, "big")
    return bytes(data)


def _silence(seconds: float, rate: int, channels: int, fmt: str, subtype: str | None = None) -> bytes:
    return encode(np.zeros((int(seconds * rate), channels), np.float32), rate, fmt, subtype)


@functools.cache
def _bomb(name: str) -> bytes:
    if name == "flac":  # the finding's 1.7 MB FLAC: 300 s at 655,350 Hz over 8 channels
        return _claiming(_silence(1.0, 655_350, 8, "FLAC"), 300 * 655_350)
    if name == "vorbis":  # the finding's 7 KB Ogg Vorbis: 2 s of 255 channels
        return _silence(2.0, 16000, 255, "OGG", "VORBIS")
    if name == "largest":  # the most the caps admit with a 60 s limit: 60 s at 48 kHz over 8 channels
        return _silence(60.0, 48000, 8, "FLAC")
    if name == "long":  # 300 s at 16 kHz: a 19.2 MB output
        return _silence(300.0, 16000, 1, "FLAC")
    raise KeyError(name)


# Each kind of bomb in each codec that can hold it: FLAC holds at most 8 channels, and
# libvorbis crashes encoding above about 200 kHz.
HEADER_BOMBS = [
    ("channels", "OGG", "VORBIS", 16000, 255, 0.2, 300, "audio has 255 channels; the limit is 8"),
    ("channels", "WAV", "PCM_16", 16000, 255, 0.5, 300, "audio has 255 channels; the limit is 8"),
    ("channels", "WAV", "FLOAT", 8000, 9, 0.5, 300, "audio has 9 channels; the limit is 8"),
    ("rate", "FLAC", "PCM_16", 655_350, 8, 1.0, 300, "sampled at 655350 Hz; the limit is 192000 Hz"),
    ("rate", "WAV", "PCM_16", 655_350, 8, 0.1, 300, "sampled at 655350 Hz; the limit is 192000 Hz"),
    ("rate", "OGG", "VORBIS", 200_000, 2, 0.5, 300, "sampled at 200000 Hz; the limit is 192000 Hz"),
    ("samples", "FLAC", "PCM_16", 192_000, 8, 1.0, 1, r"holds 1,536,000 samples \(1.0 s over 8 channels at 192000 Hz\); "
     r"the limit is 384,000 \(1 s at 384,000 samples a second\)"),
    ("samples", "OGG", "VORBIS", 192_000, 8, 1.0, 1, "holds 1,536,000 samples"),
    ("samples", "WAV", "PCM_16", 96_000, 8, 1.0, 1, "holds 768,000 samples"),
    ("duration", "FLAC", "PCM_16", 16000, 1, 3.0, 2, "audio is 3.0 s long; the limit is 2 s"),
    ("duration", "OGG", "VORBIS", 16000, 1, 3.0, 2, "audio is 3.0 s long; the limit is 2 s"),
    ("duration", "WAV", "PCM_16", 16000, 1, 3.0, 2, "audio is 3.0 s long; the limit is 2 s"),
]


@pytest.mark.parametrize("kind,fmt,subtype,rate,channels,seconds,max_seconds,message", HEADER_BOMBS,
                         ids=[f"{b[0]}-{b[1]}-{b[2]}" for b in HEADER_BOMBS])
def test_each_kind_of_bomb_is_refused_from_its_header(kind, fmt, subtype, rate, channels, seconds, max_seconds, message):
    data = _silence(seconds, rate, channels, fmt, subtype)
    # A deadline already past: had one block been read, the decoder would have stopped with
    # TimedOut, so AudioTooLarge here means nothing was decoded.
    with pytest.raises(AudioTooLarge, match=message):
        decode_audio(data, max_seconds=max_seconds, deadline=time.monotonic() - 1)


def test_the_findings_bombs_are_refused_from_their_headers():
    flac, vorbis = _bomb("flac"), _bomb("vorbis")
    assert len(flac) < 10_000 and sf.info(io.BytesIO(flac)).duration == 300.0
    assert len(vorbis) < 10_000 and sf.info(io.BytesIO(vorbis)).channels == 255
    with pytest.raises(AudioTooLarge, match="sampled at 655350 Hz; the limit is 192000 Hz"):
        decode_audio(flac, deadline=time.monotonic() - 1)
    with pytest.raises(AudioTooLarge, match="audio has 255 channels; the limit is 8"):
        decode_audio(vorbis, deadline=time.monotonic() - 1)


def test_what_the_caps_admit_is_allowed():
    """The caps' edges decode: 192 kHz, 8 channels, and the whole sample budget."""
    assert len(decode_audio(_silence(0.5, 192_000, 2, "FLAC"))) == 8000
    assert len(decode_audio(_silence(0.5, 16000, 8, "OGG", "VORBIS"), channel=7)) == 8000
    assert len(decode_audio(_silence(1.0, 48000, 8, "WAV", "PCM_16"), max_seconds=1)) == 16000


def test_a_header_without_a_length_is_refused():
    data = _claiming(encode(speech_like(2.0), 16000, "FLAC"), 0)  # as a live encoder writes it
    with pytest.raises(DecodeFailed, match="does not give its length"):
        decode_audio(data)


def test_the_read_stops_at_the_caps_whatever_the_header_claims(monkeypatch):
    """libsndfile stops where the header says; were it to read on, the decoder stops at the
    duration and sample caps all the same, and a short claim only grows the output."""
    monkeypatch.setattr(sf.SoundFile, "frames", property(lambda self: 100))
    with pytest.raises(AudioTooLarge, match="longer than the 5 s limit"):
        decode_audio(encode(speech_like(10.0), 16000, "WAV", "PCM_16"), max_seconds=5)
    with pytest.raises(AudioTooLarge, match="more than 1,920,000 samples, the limit for 5 s"):
        decode_audio(_silence(4.0, 96_000, 8, "WAV", "PCM_16"), max_seconds=5)
    out = decode_audio(encode(speech_like(3.0, 8000), 8000, "WAV", "PCM_16"))
    assert len(out) == 48000 and np.abs(out).max() > 0.05


def test_decoding_stops_at_its_deadline_between_blocks(monkeypatch):
    """A clock that moves one second per look, from 0: with the deadline at 2.5, the decoder
    reads three blocks of a 60 s turn's fifteen and stops at its fourth look."""
    clock = iter(range(10**6))
    monkeypatch.setattr(audio, "time", types.SimpleNamespace(monotonic=lambda: next(clock)))
    data = encode(speech_like(60.0), 16000, "WAV", "PCM_16")
    with pytest.raises(TimedOut, match=r"ran past its time limit after 12.1 s of audio"):
        decode_audio(data, deadline=2.5)


# Decoded in a child process whose address space may grow only this far past what the
# interpreter, numpy, soundfile and soxr already hold; the file before decoding is read in.
_LIMITED = r"""
import resource, sys
from pathlib import Path
from emotion.engine.audio import decode_audio
from emotion.errors import EmotionError
data = Path(sys.argv[1]).read_bytes()
size = next(int(x.split()[1]) * 1024 for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (size + int(sys.argv[2]) * 2**20, resource.RLIM_INFINITY))
try:
    print("decoded", len(decode_audio(data, max_seconds=float(sys.argv[3]))))
except EmotionError as exc:
    print(exc.code, exc.message)
"""


@pytest.mark.parametrize("name,max_seconds,headroom_mb,expected", [
    ("flac", 300, 64, "too_large audio is sampled at 655350 Hz"),  # decoded whole: 6.3 GB
    ("vorbis", 300, 64, "too_large audio has 255 channels"),  # decoded whole: 33 MB and up
    ("largest", 60, 64, "decoded 960000"),  # decoded whole: 92 MB; in blocks: its 3.8 MB output
    ("long", 300, 8, "too_large audio needs more memory to decode than the process has free"),
])
def test_a_bomb_decodes_within_a_memory_limit_or_is_refused(name, max_seconds, headroom_mb, expected, tmp_path):
    path = tmp_path / name
    path.write_bytes(_bomb(name))
    child = subprocess.run([sys.executable, "-c", _LIMITED, str(path), str(headroom_mb), str(max_seconds)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.startswith(expected), child.stdout
