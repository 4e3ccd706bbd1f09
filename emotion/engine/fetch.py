"""Where a turn's audio comes from: a URL, a file under an allowed root, or inline base64.

Every reference is hostile until checked. URLs are fetched only over http(s), from hosts
whose every address is public (or allow-listed by the operator), checked when each
connection is opened, so redirects and DNS tricks get the same check. Files are opened one
directory at a time beneath the root, following no link. No log line or error message of
ours, httpx's or httpcore's carries a URL's query or credentials (presigned URLs sign there).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import errno
import http.cookiejar
import ipaddress
import logging
import os
import re
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx
import idna

from emotion.engine.audio import RAW_ENCODINGS
from emotion.errors import AudioTooLarge, BadReference, FetchFailed, ReferenceRefused, TimedOut
from emotion.settings import Settings

MAX_REDIRECTS = 3
_KINDS = ("url", "path", "base64")


@dataclass(frozen=True)
class AudioRef:
    kind: str
    value: str
    encoding: str | None = None
    sample_rate_hz: int | None = None
    channel: int | None = None  # None: the mix of all channels

    def describe(self) -> str:
        """A log-safe description: never the audio, never a URL's query."""
        if self.kind == "base64":
            return f"base64 ({len(self.value)} chars)"
        if self.kind == "url":
            parts = urlsplit(self.value)
            return f"url {parts.scheme}://{parts.hostname}{parts.path}"
        return f"path {self.value}"


def parse_audio_ref(meta: Any) -> AudioRef:
    """Parse ``metadata.audio``: exactly one of url, path, base64; optional encoding, sample_rate."""
    if not isinstance(meta, dict):
        raise BadReference(f"metadata.audio must be an object, got {type(meta).__name__}")
    given = [k for k in _KINDS if meta.get(k) not in (None, "")]
    if len(given) != 1:
        raise BadReference(f"metadata.audio needs exactly one of url, path, base64; got {given or 'none'}")
    kind = given[0]
    value = meta[kind]
    if not isinstance(value, str):
        raise BadReference(f"metadata.audio.{kind} must be a string")
    if kind == "url":
        _parse_url(value)  # its form now; whether it is allowed, when it is fetched
    encoding = meta.get("encoding")
    if encoding is not None and (not isinstance(encoding, str) or encoding.lower() not in RAW_ENCODINGS):
        raise BadReference(f"metadata.audio.encoding must be one of {', '.join(sorted(RAW_ENCODINGS))}")
    rate = meta.get("sample_rate")
    if rate is not None:
        # NaN and infinity parse from JSON too; the range check refuses them before int().
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 1000 <= rate <= 192_000 or rate != int(rate):
            raise BadReference("metadata.audio.sample_rate must be an integer in [1000, 192000]")
        rate = int(rate)
    if encoding is not None and rate is None:
        raise BadReference(f"headerless {encoding} audio needs metadata.audio.sample_rate (8000 for phone audio)")
    return AudioRef(kind, value, encoding.lower() if encoding else None, rate, parse_channel(meta.get("channel")))


def parse_channel(value: Any) -> int | None:
    """``channel``: an index from 0, or ``"mix"`` (the default) for the mean of all channels."""
    if value is None or value == "mix":
        return None
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
        raise BadReference(f"channel must be an index from 0 or 'mix', got {value!r}")
    return value


class AudioFetcher:
    """Reads the bytes behind an ``AudioRef`` within the operator's limits."""

    def __init__(self, config: Settings) -> None:
        self.config = config
        self.max_bytes = config.max_audio_bytes
        hosts, nets = config.allow_networks()
        self._guard = _AddressGuard(hosts, nets)
        # A cookie policy that accepts nothing: one caller's URL must not set cookies
        # that a later fetch would send.
        jar = http.cookiejar.CookieJar(policy=http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
        timeout = httpx.Timeout(config.fetch_timeout_s, connect=min(3.0, config.fetch_timeout_s))
        self._client = httpx.AsyncClient(
            transport=_GuardedTransport(self._guard, config.max_url_connections),
            timeout=timeout,
            follow_redirects=False,
            cookies=jar,
            trust_env=False,
            # The body is read raw (the byte cap counts what arrives, never what a small
            # compressed body inflates to), so no compression is invited.
            headers={"User-Agent": "rasa-emotion2vec", "Accept-Encoding": "identity"},
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def fetch(self, ref: AudioRef) -> bytes:
        if ref.kind == "base64":
            return await asyncio.to_thread(self._inline, ref.value)
        if ref.kind == "path":
            return await asyncio.to_thread(self._read_path, ref.value)
        return await self._download(ref.value)  # the engine bounds the whole fetch

    def _inline(self, text: str) -> bytes:
        if text.startswith("data:"):
            header, sep, text = text.partition(",")
            if not sep or not header.endswith(";base64"):
                raise BadReference("a data: URI must be base64-encoded (data:audio/wav;base64,...)")
        if len(text) * 3 // 4 > self.max_bytes:
            raise AudioTooLarge(f"inline audio is over {self.max_bytes} bytes")
        try:
            return base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise BadReference(f"inline audio is not valid base64: {exc}") from None

    def _read_path(self, value: str) -> bytes:
        root = self.config.audio_root
        if not root:
            raise ReferenceRefused("path references are disabled (set EMOTION_AUDIO_ROOT to allow a directory)")
        root_path = Path(root).resolve()
        try:
            target = (root_path / value).resolve()
        except (OSError, RuntimeError, ValueError):
            raise BadReference(f"cannot resolve path {value!r}") from None
        # Containment first, so nothing is said about files outside the root. From here on
        # nothing outside the root is looked at: every answer below describes the root alone.
        if not target.is_relative_to(root_path):
            raise ReferenceRefused(f"{value!r} is outside the audio root")
        names = target.relative_to(root_path).parts
        if not names:
            raise ReferenceRefused(f"{value!r} is not a regular file")
        try:
            fd = _open_beneath(root_path, names)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise FetchFailed(f"no such file under the audio root: {value!r}") from None
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # Linux answers ENOTDIR for a link opened as a directory
                raise ReferenceRefused(
                    f"{value!r} is not a file under the audio root (a link was swapped in on its way, "
                    "or a file stands where a directory should)"
                ) from None
            raise FetchFailed(f"cannot open {value!r}: {exc.strerror}") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise ReferenceRefused(f"{value!r} is not a regular file")
        with os.fdopen(fd, "rb") as f:
            if info.st_size > self.max_bytes:
                raise AudioTooLarge(f"{value!r} is {info.st_size} bytes; the limit is {self.max_bytes}")
            data = f.read(self.max_bytes + 1)
        if len(data) > self.max_bytes:
            raise AudioTooLarge(f"{value!r} is over {self.max_bytes} bytes")
        return data

    async def _download(self, url: str) -> bytes:
        for hop in range(MAX_REDIRECTS + 1):
            try:
                _check_url(url)
            except BadReference:
                if hop == 0:
                    raise
                raise FetchFailed("audio URL redirected to a malformed location") from None  # the server's fault
            try:
                async with self._client.stream("GET", url) as response:
                    if response.is_redirect:
                        location = response.headers.get("location", "")
                        url = str(response.url.join(location))
                        continue
                    if response.status_code != 200:
                        raise FetchFailed(f"audio URL answered HTTP {response.status_code}")
                    coding = response.headers.get("content-encoding", "identity").strip().lower()
                    if coding not in ("identity", ""):
                        raise FetchFailed(f"audio URL sent {coding}-compressed audio, though asked for none")
                    declared = response.headers.get("content-length", "")
                    if declared.isdigit() and int(declared) > self.max_bytes:
                        raise AudioTooLarge(f"audio URL declares {declared} bytes; the limit is {self.max_bytes}")
                    chunks, total = [], 0
                    async for chunk in response.aiter_raw():
                        total += len(chunk)
                        if total > self.max_bytes:
                            raise AudioTooLarge(f"audio URL sent more than {self.max_bytes} bytes")
                        chunks.append(chunk)
                    return b"".join(chunks)
            except httpx.TimeoutException:
                raise TimedOut("audio URL timed out") from None
            except (httpx.InvalidURL, idna.IDNAError):
                # The URL itself was checked above: httpx reads a redirect's Location as it answers,
                # and an invalid one raises outside httpx's error tree.
                raise FetchFailed("audio URL redirected to a malformed location") from None
            except httpx.HTTPError as exc:
                raise FetchFailed(f"audio URL failed: {type(exc).__name__}: {_redact(str(exc))}") from None
        raise FetchFailed(f"audio URL redirected more than {MAX_REDIRECTS} times")


def _open_beneath(root: Path, names: tuple[str, ...]) -> int:
    """Opens ``root/names...`` one directory at a time, following no link on the way.

    The path was resolved and found inside the root, but any directory on it can be swapped
    for a link to elsewhere before the open, and O_NOFOLLOW guards the last name only. Each
    name is opened relative to the directory opened before it, so what is opened is what was
    checked. This works wherever ``os.open`` takes ``dir_fd`` (Linux, macOS, the BSDs); reading
    the path back from /proc/self/fd is Linux-only, and comparing ``stat`` results before and
    after the open leaves a window between the two.
    """
    directory = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in names[:-1]:
            inner = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=directory)
            os.close(directory)
            directory = inner
        # O_NONBLOCK: a FIFO swapped in after the check must not hang the open.
        return os.open(names[-1], os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW, dir_fd=directory)
    finally:
        os.close(directory)


# A host name: letters, digits, hyphens (and underscores, which some storage hosts carry),
# 1 to 63 to a label. Anything else (a space httpx would percent-encode, an empty or overlong
# label) would only fail later, in the resolver, or raise there (Python's idna codec).
_LABEL = re.compile(r"[a-z0-9_-]{1,63}")


def _parse_url(url: str) -> httpx.URL:
    """httpx's reading of ``url`` (the one the request will use); BadReference if it has none."""
    try:
        parsed = httpx.URL(url)
        port = parsed.port
    except (httpx.InvalidURL, ValueError) as exc:  # idna.IDNAError is a ValueError
        raise BadReference(f"audio URL is malformed: {_redact(str(exc))}") from None
    if parsed.scheme not in ("http", "https"):
        return parsed  # refused when fetched; its form is no concern of ours
    host = parsed.raw_host.decode("ascii")
    if not host:
        raise BadReference("audio URL has no host")
    if not _is_host(host):
        raise BadReference("audio URL host is not a valid host name or address")
    if port is not None and not 0 < port < 65536:
        raise BadReference(f"audio URL port {port} is out of range")
    return parsed


def _is_host(host: str) -> bool:
    if "%" not in host:  # an IPv6 zone (fe80::1%eth0) names a link, never a storage server
        try:
            ipaddress.ip_address(host)
            return True
        except ValueError:
            pass
    name = host.removesuffix(".")
    if len(name) > 253:
        return False
    for label in name.split("."):
        if not _LABEL.fullmatch(label):
            return False
        if label.startswith("xn--"):
            try:
                idna.decode(label)
            except idna.IDNAError:
                return False
    return True


def _check_url(url: str) -> None:
    parsed = _parse_url(url)
    if parsed.scheme not in ("http", "https"):
        raise ReferenceRefused(f"audio URL scheme {parsed.scheme!r} is not allowed (http or https only)")
    if parsed.userinfo:
        raise ReferenceRefused("audio URLs with credentials are not allowed")


# Credentials (scheme://user:pw@) and a query or fragment wherever they follow text: a
# presigned URL's signature is in its query, and httpcore writes a redirect's Location
# (often relative) into its debug log.
_USERINFO = re.compile(r"(?<=://)[^/\s'\"@]*@")
_QUERY = re.compile(r"(?<=\S)[?#][^\s'\"]*")


def _redact(text: str) -> str:
    """``text`` without any URL's credentials, query or fragment."""
    return _QUERY.sub("", _USERINFO.sub("", text))


class _RedactURLs(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is logging's to report, not ours
            return True
        redacted = _redact(message)
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True


def _redact_library_logs() -> None:
    """httpx logs each request's full URL at INFO, httpcore response headers at DEBUG.

    A filter on their loggers, not a raised level: the request line is what an operator reads
    when a fetch misbehaves, and levels are the host application's to set (a root logger at
    DEBUG, or httpx set to INFO, would bring the signatures back). A logger's filter sees only
    the records logged on that very logger, so each of theirs gets one.
    """
    names = ["httpx"] + [n for n in logging.root.manager.loggerDict if n.startswith(("httpx.", "httpcore."))]
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _RedactURLs) for f in logger.filters):
            logger.addFilter(_RedactURLs())


_redact_library_logs()


# IPv6 prefixes whose addresses carry an IPv4 address that their packets end up at: through
# a NAT64 gateway, a 6to4 or Teredo relay, or the deprecated IPv4-compatible and -translated
# forms. Python judges such an address by its IPv6 prefix alone (64:ff9b::10.0.0.1 is
# "global"), so the IPv4 address it carries must be public too.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215
_NAT64_LOCAL_96 = ipaddress.IPv6Network("64:ff9b:1::/96")
_IPV4_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")  # RFC 2765
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # RFC 4291, deprecated


def _ipv4_inside(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> list[ipaddress.IPv4Address] | None:
    """The IPv4 addresses ``ip`` delivers to: [] for none, None when it cannot be told."""
    if ip.version == 4:
        return []
    if ip.ipv4_mapped:
        return [ip.ipv4_mapped]
    if ip.sixtofour:
        return [ip.sixtofour]
    if ip.teredo:
        return list(ip.teredo)  # the Teredo server and the client behind its NAT
    last_32_bits = ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)
    if ip in _NAT64 or ip in _NAT64_LOCAL_96 or ip in _IPV4_TRANSLATED or ip in _IPV4_COMPATIBLE:
        return [last_32_bits]
    if ip in _NAT64_LOCAL:
        # Under a local-use prefix the operator puts the IPv4 address at bit 48, 56, 64 or 96
        # (RFC 6052 section 2.2); only the /96 form, DNS64's default, says where it is.
        return None
    return []


def _is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    # Python counts the deprecated site-local fec0::/10 as global; a network may still route it inside.
    return ip.is_global and not ip.is_multicast and not (ip.version == 6 and ip.is_site_local)


class _AddressGuard:
    def __init__(self, hosts: set[str], nets: list) -> None:
        self.hosts = hosts
        self.nets = nets

    def allowed(self, host: str, address: str) -> bool:
        if host.lower().rstrip(".") in self.hosts:
            return True
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        inside = _ipv4_inside(ip)
        candidates = [ip, *(inside or [])]
        # The operator may allow the address or the IPv4 address it reaches.
        if any(c in net for c in candidates for net in self.nets if c.version == net.version):
            return True
        return inside is not None and all(_is_public(c) for c in candidates)


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    """Resolves the host itself, refuses internal addresses, and connects to the address it checked."""

    def __init__(self, guard: _AddressGuard) -> None:
        self._guard = guard
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:  # UnicodeError: a name Python's idna codec refuses
            raise httpcore.ConnectError(f"cannot resolve {host}: {getattr(exc, 'strerror', None) or exc}") from None
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
        refused = [a for a in addresses if not self._guard.allowed(host, a)]
        if refused or not addresses:
            raise ReferenceRefused(
                f"audio host {host} resolves to {', '.join(refused) or 'nothing'}, which is internal "
                "(allow it with EMOTION_URL_ALLOW)"
            )
        # Each address was checked above; dial them in turn until one answers, as a host with a
        # dead address among several (an IPv6 one where IPv6 is down) still serves.
        for address in addresses[:-1]:
            try:
                return await self._inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout):
                continue
        return await self._inner.connect_tcp(addresses[-1], port, timeout, local_address, socket_options)

    async def connect_unix_socket(self, *args, **kwargs):  # pragma: no cover - never used
        raise ReferenceRefused("unix sockets are not allowed")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _GuardedTransport(httpx.AsyncHTTPTransport):
    def __init__(self, guard: _AddressGuard, max_connections: int) -> None:
        # One TLS context (loading the CA bundle takes tens of ms), given to httpx too.
        ssl_context = httpx.create_ssl_context()
        super().__init__(verify=ssl_context, retries=0)
        # httpx builds its connection pool privately; swap in one whose every connection
        # goes through the guard.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            # Every admitted turn may be fetching at once. httpx's defaults (100 connections,
            # 20 kept idle) would queue fetches behind a slow storage server and close most
            # connections after each burst, each closed one holding a local port in TIME_WAIT
            # for a minute: at a few hundred URL turns a second the ports run out.
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=5.0,
            network_backend=_GuardedBackend(guard),
        )
