"""Audio fetching for the ``play`` verb: ``AudioFetcher`` downloads an ``http(s)://`` URL or reads
a local file under one allowed directory, decodes it to PCM at the call's rate, and caches it.

An agent chooses the URLs, so the fetcher is careful with them: hosts that resolve to loopback,
private, link-local or otherwise reserved addresses are refused unless ``allow_private_hosts``
(checked for every request, redirects included), and errors never show local paths."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
import socket
from pathlib import Path
from urllib.parse import unquote, urlsplit

import httpx

from media.prompts import PromptDecodeError, decode_audio_file
from worker.agent.connection import redact_url
from worker.errors import RemoteError
from worker.session.tts import PcmCache

__all__ = ["AudioFetcher", "FetchError"]

log = logging.getLogger(__name__)

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_MB = 1024 * 1024


class FetchError(RemoteError):
    """The audio a verb asked for cannot be played: unreachable, refused, too big, not allowed,
    or not audio. The message is meant for humans (logs, ``jambonz:error``)."""


# (source, sample_rate, mtime_ns): source is the URL, or the resolved path of a local file whose
# modification time is part of the key so an edited prompt is read again.
_Key = tuple[str, int, int | None]


class AudioFetcher:
    """Fetches ``play`` URLs and prompt files as mono s16le PCM at a requested sample rate.

    * ``http://`` / ``https://``: GET with ``httpx`` (redirects followed, per-operation
      ``timeout``, whole-download ``total_timeout``, body limited to ``max_bytes``).
    * ``file://`` URLs and plain paths: only inside ``allowed_root`` (after resolving symlinks and
      ``..``; relative paths are taken from it). With no ``allowed_root`` local files are refused.
    * anything else: refused.

    Decoding (any format FFmpeg reads) runs in a worker thread. Results are cached in an LRU
    bounded by ``cache_max_bytes`` of PCM. Pass ``client`` to share an ``httpx.AsyncClient``;
    otherwise the fetcher makes its own, closed by ``aclose()``.
    """

    def __init__(
        self,
        *,
        allowed_root: str | os.PathLike[str] | None = None,
        client: httpx.AsyncClient | None = None,
        timeout: float = 10.0,
        total_timeout: float = 30.0,
        max_bytes: int = 20 * _MB,
        max_seconds: float = 600.0,
        max_redirects: int = 5,
        cache_max_bytes: int = 64 * _MB,
        allow_private_hosts: bool = True,
    ) -> None:
        if timeout <= 0 or total_timeout <= 0 or max_bytes <= 0 or max_seconds <= 0:
            raise ValueError("timeout, total_timeout, max_bytes and max_seconds must be positive")
        self.allowed_root: Path | None = None
        if allowed_root is not None:
            root = Path(allowed_root).resolve()
            if not root.is_dir():
                raise ValueError(f"allowed_root {root} is not a directory")
            self.allowed_root = root
        self.timeout = timeout
        self.total_timeout = total_timeout
        self.max_bytes = max_bytes
        self.max_seconds = max_seconds
        self.max_redirects = max_redirects
        self.allow_private_hosts = allow_private_hosts
        self.cache: PcmCache[_Key] = PcmCache(cache_max_bytes)
        self._client = client
        self._owns_client = client is None

    async def __aenter__(self) -> AudioFetcher:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP client if this fetcher created it."""
        if self._owns_client and self._client is not None:
            await self._client.aclose()
            self._client = None

    async def fetch(self, url_or_path: str, sample_rate: int) -> bytes:
        """Return the audio at ``url_or_path`` as mono s16le PCM at ``sample_rate``.

        Raises ``FetchError`` for anything wrong with the source; ``ValueError`` for a bad
        ``sample_rate``.
        """
        if not isinstance(sample_rate, int) or sample_rate <= 0:
            raise ValueError(f"sample_rate must be a positive int, not {sample_rate!r}")
        match = _SCHEME.match(url_or_path)
        scheme = match.group(1).lower() if match else ""
        if scheme in ("http", "https"):
            return await self._fetch_http(url_or_path, sample_rate)
        if scheme == "file":
            return await self._fetch_file(_file_url_path(url_or_path), url_or_path, sample_rate)
        if scheme == "":
            return await self._fetch_file(url_or_path, url_or_path, sample_rate)
        raise FetchError(f"cannot play {_display(url_or_path)}: unsupported URL scheme {scheme!r}")

    async def _fetch_http(self, url: str, sample_rate: int) -> bytes:
        key: _Key = (url, sample_rate, None)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        shown = _display(url)
        try:
            _ = urlsplit(url).port  # httpx lets an out-of-range port escape as OverflowError
        except ValueError as exc:
            raise FetchError(f"cannot fetch {shown}: invalid URL ({exc})") from None
        body = await self._download(url, shown)
        pcm = await self._decode(body, shown, sample_rate)
        self.cache.put(key, pcm)
        log.info(
            "fetched %s: %d bytes, %d bytes of PCM at %d Hz",
            shown,
            len(body),
            len(pcm),
            sample_rate,
        )
        return pcm

    async def _download(self, url: str, shown: str) -> bytes:
        client = self._http_client()
        try:
            async with (
                asyncio.timeout(self.total_timeout),
                client.stream("GET", url, follow_redirects=True) as response,
            ):
                if not response.is_success:
                    raise FetchError(
                        f"cannot fetch {shown}: HTTP {response.status_code} "
                        f"{response.reason_phrase}".rstrip()
                    )
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > self.max_bytes:
                    raise FetchError(
                        f"cannot fetch {shown}: {int(declared)} bytes is over the "
                        f"{_size(self.max_bytes)} limit"
                    )
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > self.max_bytes:
                        raise FetchError(
                            f"cannot fetch {shown}: body is over the {_size(self.max_bytes)} limit"
                        )
                return bytes(body)
        except TimeoutError:
            raise FetchError(
                f"cannot fetch {shown}: took longer than {self.total_timeout} s"
            ) from None
        except httpx.TimeoutException as exc:
            raise FetchError(f"cannot fetch {shown}: timed out ({type(exc).__name__})") from exc
        except httpx.TooManyRedirects as exc:
            raise FetchError(
                f"cannot fetch {shown}: more than {self.max_redirects} redirects"
            ) from exc
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise FetchError(f"cannot fetch {shown}: {type(exc).__name__}: {exc}") from exc

    def _http_client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=self.timeout,
                max_redirects=self.max_redirects,
                headers={"User-Agent": "aispinner-worker"},
                event_hooks={"request": [self._check_host]},
            )
        return self._client

    async def _check_host(self, request: httpx.Request) -> None:
        """Refuse a request (the first or a redirect) to a host on a private network."""
        if self.allow_private_hosts:
            return
        host = request.url.host
        shown = _display(str(request.url))
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, request.url.port or 443, type=socket.SOCK_STREAM
            )
        except (OSError, UnicodeError) as exc:
            raise FetchError(f"cannot fetch {shown}: cannot resolve {host!r}") from exc
        for info in infos:
            address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
            if not address.is_global:
                raise FetchError(
                    f"cannot fetch {shown}: {host} is a private or local address, and "
                    "prompts.allow_private_urls is off"
                )

    async def _fetch_file(self, raw_path: str, shown: str, sample_rate: int) -> bytes:
        if self.allowed_root is None:
            raise FetchError(f"cannot play {shown}: local files are not allowed here")
        path, mtime_ns, size = self._check_local(raw_path, shown)
        key: _Key = (str(path), sample_rate, mtime_ns)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        if size > self.max_bytes:
            raise FetchError(f"cannot play {shown}: file is over the {_size(self.max_bytes)} limit")
        try:
            data = await asyncio.to_thread(_read_limited, path, self.max_bytes)
        except OSError as exc:
            raise FetchError(f"cannot read {shown}: {exc.strerror or exc}") from exc
        if len(data) > self.max_bytes:
            raise FetchError(f"cannot play {shown}: file is over the {_size(self.max_bytes)} limit")
        pcm = await self._decode(data, shown, sample_rate)
        self.cache.put(key, pcm)
        return pcm

    def _check_local(self, raw_path: str, shown: str) -> tuple[Path, int, int]:
        """Resolve ``raw_path`` inside the allowed root; return it with its mtime and size."""
        root = self.allowed_root
        assert root is not None
        if not raw_path or "\x00" in raw_path:
            raise FetchError(f"cannot play {shown!r}: not a valid path")
        candidate = Path(raw_path)
        if not candidate.is_absolute():
            candidate = root / candidate
        try:
            resolved = candidate.resolve()
        except (OSError, RuntimeError) as exc:
            raise FetchError(f"cannot play {shown}: {type(exc).__name__}") from exc
        if not resolved.is_relative_to(root):
            raise FetchError(f"cannot play {shown}: outside the prompts folder")
        try:
            stat = resolved.stat()
        except FileNotFoundError:
            raise FetchError(f"cannot play {shown}: no such file") from None
        except OSError as exc:
            raise FetchError(f"cannot play {shown}: {exc.strerror or exc}") from exc
        if not resolved.is_file():
            raise FetchError(f"cannot play {shown}: not a regular file")
        return resolved, stat.st_mtime_ns, stat.st_size

    async def _decode(self, data: bytes, shown: str, sample_rate: int) -> bytes:
        try:
            return await asyncio.to_thread(
                decode_audio_file, data, sample_rate, max_seconds=self.max_seconds
            )
        except PromptDecodeError as exc:
            reason = str(exc).removeprefix("<bytes>: ")
            raise FetchError(f"cannot play {shown}: {reason}") from exc


def _file_url_path(url: str) -> str:
    """The local path of a ``file:`` URL (``file:///a/b.wav``, ``file://localhost/a/b.wav``)."""
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise FetchError(f"cannot play {url}: file URLs on other hosts are not supported")
    return unquote(parts.path)


def _read_limited(path: Path, limit: int) -> bytes:
    """Read at most ``limit + 1`` bytes, so a file that grew past the limit is noticed."""
    with path.open("rb") as f:
        return f.read(limit + 1)


def _display(url: str) -> str:
    """``url`` without credentials and query string (signed URLs carry secrets there); ``?…``
    marks a query that was left out."""
    try:
        query = urlsplit(url).query
    except ValueError:
        query = ""
    return redact_url(url) + ("?…" if query else "")


def _size(n: int) -> str:
    return f"{n / _MB:g} MB" if n >= _MB else f"{n} bytes"
