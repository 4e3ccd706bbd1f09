"""Where a turn's audio comes from: a URL, a file under an allowed root, or inline base64.

Every reference is hostile until checked. URLs are fetched only over http(s), from hosts
whose every address is public (or allow-listed by the operator), checked when each
connection is opened, so redirects and DNS tricks get the same check.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import http.cookiejar
import ipaddress
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx

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
        # Containment first, so nothing is said about files outside the root.
        if not target.is_relative_to(root_path):
            raise ReferenceRefused(f"{value!r} is outside the audio root")
        if not target.exists():
            raise FetchFailed(f"no such file under the audio root: {value!r}")
        try:
            # O_NONBLOCK: a FIFO swapped in after the check must not hang the open.
            fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        except OSError as exc:
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
        for _hop in range(MAX_REDIRECTS + 1):
            _check_url(url)
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
            except httpx.HTTPError as exc:
                raise FetchFailed(f"audio URL failed: {type(exc).__name__}: {exc}") from None
        raise FetchFailed(f"audio URL redirected more than {MAX_REDIRECTS} times")


def _check_url(url: str) -> None:
    try:
        parts = urlsplit(url)
    except ValueError:
        raise BadReference("audio URL is malformed") from None
    if parts.scheme not in ("http", "https"):
        raise ReferenceRefused(f"audio URL scheme {parts.scheme!r} is not allowed (http or https only)")
    if not parts.hostname:
        raise BadReference("audio URL has no host")
    if parts.username or parts.password:
        raise ReferenceRefused("audio URLs with credentials are not allowed")


class _AddressGuard:
    def __init__(self, hosts: set[str], nets: list) -> None:
        self.hosts = hosts
        self.nets = nets

    def allowed(self, host: str, address: str) -> bool:
        if host.lower().rstrip(".") in self.hosts:
            return True
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        mapped = getattr(ip, "ipv4_mapped", None)
        candidates = [ip] + ([mapped] if mapped else [])
        if any(c in net for c in candidates for net in self.nets if c.version == net.version):
            return True
        return all(c.is_global and not c.is_multicast for c in candidates)


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    """Resolves the host itself, refuses internal addresses, and connects to the address it checked."""

    def __init__(self, guard: _AddressGuard) -> None:
        self._guard = guard
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc.strerror}") from None
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
        refused = [a for a in addresses if not self._guard.allowed(host, a)]
        if refused or not addresses:
            raise ReferenceRefused(
                f"audio host {host} resolves to {', '.join(refused) or 'nothing'}, which is internal "
                "(allow it with EMOTION_URL_ALLOW)"
            )
        return await self._inner.connect_tcp(addresses[0], port, timeout, local_address, socket_options)

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
