"""Audio references: metadata parsing, inline base64, files under the root, URLs on loopback."""

import asyncio
import gzip
import os
import time

import pytest
from conftest import LocalHTTPServer, b64, wav_bytes
from hypothesis import given, settings
from hypothesis import strategies as st

from emotion.engine.fetch import AudioFetcher, AudioRef, parse_audio_ref
from emotion.errors import AudioTooLarge, BadReference, EmotionError, FetchFailed, ReferenceRefused, TimedOut
from emotion.settings import Settings


def fetch(ref, **config):
    async def main():
        fetcher = AudioFetcher(Settings(**config))
        try:
            return await fetcher.fetch(ref)
        finally:
            await fetcher.aclose()

    return asyncio.run(main())


@pytest.mark.parametrize(
    "meta,message",
    [
        ("http://x", "must be an object"),
        ({}, "exactly one of url, path, base64"),
        ({"url": "http://a", "base64": "AAAA"}, "exactly one"),
        ({"url": 5}, "must be a string"),
        ({"base64": "AAAA", "encoding": "gsm"}, "encoding must be one of"),
        ({"base64": "AAAA", "encoding": "mulaw"}, "needs metadata.audio.sample_rate"),
        ({"base64": "AAAA", "encoding": "mulaw", "sample_rate": 7.5}, "integer"),
        ({"base64": "AAAA", "sample_rate": True}, "integer"),
    ],
)
def test_malformed_metadata_is_a_clear_error(meta, message):
    with pytest.raises(BadReference, match=message):
        parse_audio_ref(meta)


def test_metadata_with_telephony_encoding():
    ref = parse_audio_ref({"base64": "AAAA", "encoding": "MULAW", "sample_rate": 8000})
    assert ref == AudioRef("base64", "AAAA", "mulaw", 8000)


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(
                        st.sampled_from(["url", "path", "base64", "encoding", "sample_rate", "x"]), c, max_size=4),
                    max_leaves=10))
def test_metadata_parser_never_crashes(meta):
    try:
        ref = parse_audio_ref(meta)
    except BadReference:
        return
    assert ref.kind in ("url", "path", "base64")


def test_inline_base64_and_data_uri():
    data = wav_bytes(1.0)
    assert fetch(AudioRef("base64", b64(data))) == data
    assert fetch(AudioRef("base64", "data:audio/wav;base64," + b64(data))) == data


@pytest.mark.parametrize("value,error,message", [
    ("not base64 at all!!", BadReference, "not valid base64"),
    ("data:audio/wav,plain", BadReference, "base64-encoded"),
    ("A" * 20_000, AudioTooLarge, "over"),
])
def test_bad_inline_audio(value, error, message):
    with pytest.raises(error, match=message):
        fetch(AudioRef("base64", value), max_audio_bytes=10_000)


def test_paths_are_refused_without_a_root():
    with pytest.raises(ReferenceRefused, match="EMOTION_AUDIO_ROOT"):
        fetch(AudioRef("path", "/etc/hostname"))


def test_paths_under_the_root(tmp_path):
    root = tmp_path / "root"
    (root / "calls").mkdir(parents=True)
    (root / "calls" / "a.wav").write_bytes(b"RIFF....")
    (tmp_path / "secret.txt").write_text("secret")
    (root / "escape").symlink_to(tmp_path / "secret.txt")
    (root / "dev").symlink_to("/dev/zero")
    os.mkfifo(root / "fifo")
    (root / "big.wav").write_bytes(b"\0" * 20_000)
    cfg = {"audio_root": str(root), "max_audio_bytes": 10_000}
    assert fetch(AudioRef("path", "calls/a.wav"), **cfg) == b"RIFF...."
    assert fetch(AudioRef("path", str(root / "calls" / "a.wav")), **cfg) == b"RIFF...."
    for value, error, message in [
        ("../secret.txt", ReferenceRefused, "outside the audio root"),
        ("/etc/hostname", ReferenceRefused, "outside the audio root"),
        ("escape", ReferenceRefused, "outside the audio root"),
        ("dev", ReferenceRefused, "outside the audio root"),
        ("calls", ReferenceRefused, "not a regular file"),
        ("fifo", ReferenceRefused, "not a regular file"),
        ("big.wav", AudioTooLarge, "limit is 10000"),
        ("missing.wav", FetchFailed, "no such file"),
    ]:
        started = time.monotonic()
        with pytest.raises(error, match=message):
            fetch(AudioRef("path", value), **cfg)
        assert time.monotonic() - started < 2  # a FIFO must not hang the read


def test_url_from_an_allowed_loopback_server(http_server):
    data = wav_bytes(1.0)
    http_server.routes["/a.wav"] = (200, {"Set-Cookie": "track=1"}, data)
    http_server.routes["/redirect"] = (302, {"Location": "/a.wav"}, b"")
    allow = {"url_allow": ("127.0.0.1",)}
    assert fetch(AudioRef("url", http_server.url + "/a.wav"), **allow) == data
    assert fetch(AudioRef("url", http_server.url + "/redirect"), **allow) == data
    # No cookie set by one response is sent on the next request.
    assert all("Cookie" not in r["headers"] for r in http_server.requests)
    # The bytes are read as sent (undecoded, so the byte cap counts what arrives): a server
    # must not be invited to compress them.
    assert {r["headers"].get("Accept-Encoding") for r in http_server.requests} == {"identity"}


def test_a_burst_of_url_turns_keeps_its_connections_for_the_next():
    """Storage that answers slowly has every fetch of a burst on its own connection; the
    next burst must find them all open (one closed per fetch would hold a port a minute)."""
    server = LocalHTTPServer(keep_alive=True)
    data = wav_bytes(0.5)
    server.routes["/slow.wav"] = (200, {"Content-Length": str(len(data))}, lambda w: (time.sleep(0.3), w.write(data)))

    async def two_bursts():
        fetcher = AudioFetcher(Settings(url_allow=("127.0.0.1",)))
        try:
            for _ in range(2):
                got = await asyncio.gather(*(fetcher.fetch(AudioRef("url", server.url + "/slow.wav")) for _ in range(40)))
                assert got == [data] * 40
        finally:
            await fetcher.aclose()

    try:
        asyncio.run(two_bursts())
        assert len(server.requests) == 80 and len({r["client"] for r in server.requests}) == 40
    finally:
        server.close()


def test_loopback_is_refused_unless_allowed(http_server):
    http_server.routes["/a.wav"] = (200, {}, wav_bytes(1.0))
    with pytest.raises(ReferenceRefused, match="internal"):
        fetch(AudioRef("url", http_server.url + "/a.wav"))
    with pytest.raises(ReferenceRefused, match="internal"):
        fetch(AudioRef("url", f"http://localhost:{http_server.port}/a.wav"))
    assert http_server.requests == []  # refused before any connection


@pytest.mark.parametrize("target", [
    "http://10.0.0.1/a.wav", "http://169.254.169.254/latest/meta-data", "http://[::1]:1/a.wav",
    "http://192.168.1.1/a.wav", "http://[::ffff:10.0.0.1]/a.wav", "http://[fe80::1]/a.wav",
])
def test_redirects_to_internal_addresses_are_refused(http_server, target):
    http_server.routes["/r"] = (302, {"Location": target}, b"")
    with pytest.raises(ReferenceRefused):
        fetch(AudioRef("url", http_server.url + "/r"), url_allow=("127.0.0.1/32",))


@pytest.mark.parametrize("url,error,message", [
    ("file:///etc/passwd", ReferenceRefused, "scheme 'file'"),
    ("ftp://127.0.0.1/a.wav", ReferenceRefused, "scheme 'ftp'"),
    ("http://user:pw@127.0.0.1/a.wav", ReferenceRefused, "credentials"),
    ("http:///nohost", BadReference, "no host"),
])
def test_bad_urls(url, error, message):
    with pytest.raises(error, match=message):
        fetch(AudioRef("url", url), url_allow=("127.0.0.1",))


def test_redirect_loops_stop(http_server):
    http_server.routes["/loop"] = (302, {"Location": "/loop"}, b"")
    with pytest.raises(FetchFailed, match="redirected more than"):
        fetch(AudioRef("url", http_server.url + "/loop"), url_allow=("127.0.0.1",))


def test_byte_cap_is_enforced_while_streaming(http_server):
    sent = []

    def endless(wfile):
        for _ in range(200):
            chunk = b"\0" * 4096
            wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent.append(len(chunk))
        wfile.write(b"0\r\n\r\n")

    http_server.routes["/big"] = (200, {"Transfer-Encoding": "chunked"}, endless)
    http_server.routes["/declared"] = (200, {"Content-Length": "99999999"}, lambda w: None)
    allow = {"url_allow": ("127.0.0.1",), "max_audio_bytes": 20_000}
    with pytest.raises(AudioTooLarge, match="more than 20000"):
        fetch(AudioRef("url", http_server.url + "/big"), **allow)
    with pytest.raises(AudioTooLarge, match="declares 99999999"):
        fetch(AudioRef("url", http_server.url + "/declared"), **allow)


def test_http_errors_and_timeouts(http_server):
    http_server.routes["/slow"] = (200, {"Content-Length": "10"}, lambda w: time.sleep(3))
    allow = {"url_allow": ("127.0.0.1",)}
    with pytest.raises(FetchFailed, match="HTTP 404"):
        fetch(AudioRef("url", http_server.url + "/missing"), **allow)
    http_server.routes["/gz"] = (200, {"Content-Encoding": "gzip"}, gzip.compress(wav_bytes(1.0)))
    with pytest.raises(FetchFailed, match="sent gzip-compressed audio, though asked for none"):
        fetch(AudioRef("url", http_server.url + "/gz"), **allow)
    started = time.monotonic()
    with pytest.raises(TimedOut):
        fetch(AudioRef("url", http_server.url + "/slow"), fetch_timeout_s=0.5, **allow)
    assert time.monotonic() - started < 2.5


def test_unresolvable_host_is_a_fetch_error():
    with pytest.raises(EmotionError):
        fetch(AudioRef("url", "http://no-such-host.invalid/a.wav"))


@pytest.mark.parametrize("rate", [float("nan"), float("inf"), float("-inf"), 1e400])
def test_non_finite_sample_rates_are_bad_references(rate):
    # Python's json accepts NaN and Infinity, so a gateway can send them.
    with pytest.raises(BadReference, match="sample_rate must be an integer"):
        parse_audio_ref({"base64": "AAAA", "encoding": "mulaw", "sample_rate": rate})


@pytest.mark.parametrize("channel,expected", [(None, None), ("mix", None), (0, 0), (1, 1), ("1", 1)])
def test_channel_of_a_reference(channel, expected):
    meta = {"base64": "AAAA"} if channel is None else {"base64": "AAAA", "channel": channel}
    assert parse_audio_ref(meta).channel == expected


@pytest.mark.parametrize("channel", [-1, 1.5, True, "left", 999])
def test_bad_channels_are_bad_references(channel):
    with pytest.raises(BadReference, match="channel must be an index from 0 or 'mix'"):
        parse_audio_ref({"base64": "AAAA", "channel": channel})
