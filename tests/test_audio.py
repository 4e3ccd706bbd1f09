"""Decoding real encoded files of every supported kind, and refusing malformed ones."""

import io
import struct
import time

import numpy as np
import pytest
import soundfile as sf
from conftest import encode, speech_like
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emotion.engine.audio import decode_audio
from emotion.errors import AudioTooLarge, BadReference, DecodeFailed, EmotionError, InvalidAudio

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
    started = time.perf_counter()
    with pytest.raises(AudioTooLarge, match="3600.0 s long"):
        decode_audio(data, max_seconds=300)
    assert time.perf_counter() - started < 1.0


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
