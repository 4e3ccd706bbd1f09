"""Audio references: metadata parsing, inline base64, files under the root, URLs on loopback."""

import asyncio
import concurrent.futures
import gzip
import ipaddress
import logging
import os
import socket
import time

import pytest
from conftest import ESTABLISHED, TIME_WAIT, LocalHTTPServer, b64, free_port, sockets_to, wav_bytes
from hypothesis import given, settings
from hypothesis import strategies as st

from emotion.engine.fetch import AudioFetcher, AudioRef, _AddressGuard, parse_audio_ref
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


@pytest.fixture
def resolver(monkeypatch):
    """Host names answered without the network: {name: [addresses]}; any other name is an error."""
    names: dict[str, list[str]] = {}

    async def getaddrinfo(self, host, port, *, family=0, type=0, proto=0, flags=0):
        if host not in names:
            raise AssertionError(f"a test resolved {host!r}, which it did not set up")
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                for a in names[host]]

    monkeypatch.setattr(asyncio.base_events.BaseEventLoop, "getaddrinfo", getaddrinfo)
    return names


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
    (root / "linked").symlink_to(tmp_path, target_is_directory=True)
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
        # Through a linked directory, a file outside that exists and one that does not read alike.
        ("linked/secret.txt", ReferenceRefused, "outside the audio root"),
        ("linked/missing.txt", ReferenceRefused, "outside the audio root"),
        ("dev", ReferenceRefused, "outside the audio root"),
        ("calls", ReferenceRefused, "not a regular file"),
        ("fifo", ReferenceRefused, "not a regular file"),
        ("big.wav", AudioTooLarge, "limit is 10000"),
        ("missing.wav", FetchFailed, "no such file"),
    ]:
        pool = concurrent.futures.ThreadPoolExecutor(1)  # a FIFO must not hang the read: a bound, not a speed
        try:
            with pytest.raises(error, match=message):
                pool.submit(fetch, AudioRef("path", value), **cfg).result(timeout=30)
        finally:
            pool.shutdown(wait=False)


@pytest.mark.parametrize("outside_exists", [True, False])
def test_a_directory_swapped_for_a_link_after_the_check_is_refused(tmp_path, monkeypatch, outside_exists):
    """O_NOFOLLOW guards the last name only: `calls` checked as a directory inside the root,
    then swapped for a link to a directory outside before the open, must not be followed, and
    the answer must not say whether the file outside exists."""
    root = (tmp_path / "root").resolve()
    (root / "calls").mkdir(parents=True)
    (root / "calls" / "a.wav").write_bytes(b"RIFF....")
    outside = tmp_path / "outside"
    outside.mkdir()
    if outside_exists:
        (outside / "a.wav").write_text("secret")
    real_open, swapped = os.open, []

    def open_after_a_swap(path, *args, **kwargs):
        if not swapped and str(path).startswith(str(root)):
            (root / "calls").rename(root / "calls.real")
            (root / "calls").symlink_to(outside, target_is_directory=True)
            swapped.append(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_after_a_swap)
    with pytest.raises(ReferenceRefused, match="not a file under the audio root") as info:
        fetch(AudioRef("path", "calls/a.wav"), audio_root=str(root))
    assert swapped and "secret" not in info.value.message


def _teredo(server: str, client: str) -> str:
    """A Teredo address (RFC 4380): 2001:0::/32, the server, flags and port, the client inverted."""
    value = (0x2001_0000 << 96) | (int(ipaddress.IPv4Address(server)) << 64) | (~int(ipaddress.IPv4Address(client)) & 0xFFFF_FFFF)
    return str(ipaddress.IPv6Address(value))


# Only verdicts that hold on every Python we support: Python's own view of the IPv6 prefixes
# changes between releases (newer ones count 2002::/16 and 64:ff9b:1::/48 as not global).
@pytest.mark.parametrize("address,allowed", [
    ("8.8.8.8", True), ("10.0.0.1", False), ("2606:4700::1111", True), ("::1", False), ("fe80::1", False), ("fec0::1", False),
    ("::ffff:10.0.0.1", False),
    # NAT64, well-known prefix (RFC 6052)
    ("64:ff9b::8.8.8.8", True), ("64:ff9b::10.0.0.1", False), ("64:ff9b::127.0.0.1", False),
    ("64:ff9b::169.254.169.254", False), ("64:ff9b::224.0.0.1", False),
    # NAT64, local-use prefix (RFC 8215): the /96 form is read; elsewhere the IPv4 address cannot be found
    ("64:ff9b:1::10.0.0.1", False), ("64:ff9b:1::192.168.0.1", False), ("64:ff9b:1:ab:0:808:808:0", False),
    # 6to4 (RFC 3056)
    ("2002:a00:1::1", False), ("2002:7f00:1::1", False), ("2002:a9fe:a9fe::", False), ("2002:c0a8:101::", False),
    # IPv4-compatible (RFC 4291) and IPv4-translated (RFC 2765)
    ("::8.8.8.8", True), ("::10.0.0.1", False), ("::127.0.0.1", False), ("::ffff:0:10.0.0.1", False), ("::ffff:0:8.8.8.8", True),
    # Teredo (RFC 4380): an internal server or client, and 2001::/32 is not global in itself anyway
    (_teredo("65.54.227.120", "10.0.0.1"), False), (_teredo("192.168.1.1", "8.8.8.8"), False),
    (_teredo("65.54.227.120", "8.8.8.8"), False),
])
def test_addresses_are_judged_by_the_ipv4_address_they_carry(address, allowed):
    assert _AddressGuard(set(), []).allowed("audio.example", address) is allowed


def test_an_allowed_network_covers_the_ipv6_forms_that_reach_it():
    guard = _AddressGuard(set(), [ipaddress.ip_network("10.0.0.0/8")])
    assert guard.allowed("h", "64:ff9b::10.0.0.1") and guard.allowed("h", "::ffff:10.0.0.1")
    assert not guard.allowed("h", "64:ff9b::192.168.0.1")


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
    """Storage that answers slowly has every fetch of a burst on its own connection; all of
    them must stay open for the next burst (one closed per fetch would hold a port a minute)."""
    server = LocalHTTPServer(keep_alive=True)
    data = wav_bytes(0.5)
    server.routes["/slow.wav"] = (200, {"Content-Length": str(len(data))}, lambda w: (time.sleep(0.3), w.write(data)))

    async def two_bursts():
        fetcher = AudioFetcher(Settings(url_allow=("127.0.0.1",)))
        try:
            started = time.monotonic()
            got = await asyncio.gather(*(fetcher.fetch(AudioRef("url", server.url + "/slow.wav")) for _ in range(40)))
            assert got == [data] * 40 and len({r["client"] for r in server.requests}) == 40
            # Every connection of the burst is still open, none closed by us (TIME_WAIT): the
            # state of the sockets, not how soon the next burst comes, on a loaded machine.
            states = sockets_to(server.port)
            assert states.count(ESTABLISHED) == 40 and TIME_WAIT not in states
            got = await asyncio.gather(*(fetcher.fetch(AudioRef("url", server.url + "/slow.wav")) for _ in range(40)))
            assert got == [data] * 40
            # Idle connections close 5 s after their last response, which came after ``started``;
            # the second burst's fetches took their connections before it ended.
            if time.monotonic() - started < 5:  # so none had expired: every one was reused
                assert len({r["client"] for r in server.requests}) == 40
        finally:
            await fetcher.aclose()

    try:
        asyncio.run(two_bursts())
        assert len(server.requests) == 80
    finally:
        server.close()


def test_every_checked_address_is_tried_until_one_connects(http_server, resolver):
    """A host whose first address is dead is still fetched from its second; an internal
    address anywhere in the answer refuses the host before any connection."""
    data = wav_bytes(0.5)
    http_server.routes["/a.wav"] = (200, {}, data)
    # The server listens on 127.0.0.1 only: 127.0.0.2 on its port refuses the connection.
    resolver["audio.test"] = ["127.0.0.2", "127.0.0.1"]
    url = f"http://audio.test:{http_server.port}/a.wav"
    assert fetch(AudioRef("url", url), url_allow=("127.0.0.0/8",)) == data
    resolver["audio.test"] = ["127.0.0.2", "127.0.0.3"]
    with pytest.raises(FetchFailed, match="ConnectError"):
        fetch(AudioRef("url", url), url_allow=("127.0.0.0/8",))
    http_server.requests.clear()
    resolver["audio.test"] = ["127.0.0.1", "127.0.0.2"]
    with pytest.raises(ReferenceRefused, match="127.0.0.2"):
        fetch(AudioRef("url", url), url_allow=("127.0.0.1",))
    assert http_server.requests == []


def test_url_queries_and_credentials_stay_out_of_logs_and_errors(http_server, caplog):
    """Presigned URLs carry their signature in the query: no log line (ours, httpx's,
    httpcore's at DEBUG) and no error message may show it."""
    caplog.set_level(logging.DEBUG)
    data = wav_bytes(0.5)
    http_server.routes["/a.wav"] = (200, {}, data)
    http_server.routes["/r"] = (302, {"Location": "/a.wav?X-Amz-Signature=secret2#token=secret3"}, b"")
    allow = {"url_allow": ("127.0.0.1",)}
    assert fetch(AudioRef("url", http_server.url + "/a.wav?X-Amz-Signature=secret1"), **allow) == data
    assert fetch(AudioRef("url", http_server.url + "/r?X-Amz-Signature=secret4"), **allow) == data
    messages = []
    for url in [http_server.url + "/missing?X-Amz-Signature=secret5",
                f"http://127.0.0.1:{free_port()}/a.wav?X-Amz-Signature=secret6",
                f"http://user:secret7@127.0.0.1:{http_server.port}/a.wav"]:
        with pytest.raises(EmotionError) as info:
            fetch(AudioRef("url", url), **allow)
        messages.append(info.value.message)
    assert "secret" not in caplog.text and not any("secret" in m for m in messages), (caplog.text, messages)
    # The request line stays, without its query.
    assert f"HTTP Request: GET {http_server.url}/a.wav " in caplog.text
    assert any(r.name.startswith("httpcore") for r in caplog.records)  # the debug trace was on


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
    # The server sends nothing for 3 s, then closes short: only the 0.5 s limit says timeout.
    with pytest.raises(TimedOut):
        fetch(AudioRef("url", http_server.url + "/slow"), fetch_timeout_s=0.5, **allow)


@pytest.mark.parametrize("url", [
    "http://[v1.x]/a.wav",  # an IPvFuture literal
    "http://xn--zz.com/a.wav", "http://audio.xn--zz.com/a.wav",  # invalid A-labels
    f"http://{'a' * 70}.com/a.wav", f"http://{'a.' * 127}com/a.wav",  # a label over 63, a name over 253
    "http://a..b/a.wav", "http://.com/a.wav",  # empty labels
    "http://a b/a.wav", "http://[fe80::1%25eth0]/a.wav", "http://127.0.0.1:99999/a.wav", "http://127.0.0.1:x/a.wav",
])
def test_malformed_urls_are_bad_references(url, resolver):
    with pytest.raises(BadReference, match="audio URL"):
        parse_audio_ref({"url": url})
    with pytest.raises(BadReference, match="audio URL"):
        fetch(AudioRef("url", url), url_allow=("0.0.0.0/0", "::/0"))  # the resolver fixture fails any lookup


@pytest.mark.parametrize("location", ["http://[v1.x]/a.wav", "http://xn--zz.com/a.wav", f"http://{'a' * 70}.com/a.wav"])
def test_a_redirect_to_a_malformed_location_is_an_audio_error(http_server, resolver, location):
    http_server.routes["/r"] = (302, {"Location": location}, b"")
    resolver["audio.test"] = ["127.0.0.1"]
    with pytest.raises(FetchFailed, match="malformed|Invalid URL in location header"):
        fetch(AudioRef("url", f"http://audio.test:{http_server.port}/r"), url_allow=("127.0.0.1",))


def test_unresolvable_host_is_a_fetch_error(monkeypatch):
    async def no_such_host(self, host, port, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(asyncio.base_events.BaseEventLoop, "getaddrinfo", no_such_host)
    with pytest.raises(FetchFailed, match="cannot resolve no-such-host.invalid"):
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
