"""AudioFetcher against a real HTTP server on 127.0.0.1 and real files made by sox and ffmpeg."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest

from worker.errors import RemoteError
from worker.session.fetch import AudioFetcher, FetchError

LIMIT = 100_000  # max_bytes used by most tests
BIG = 3 * LIMIT


@dataclass
class AudioFiles:
    wav: bytes  # 1 s, 440 Hz, 16 kHz mono, made by sox
    mp3: bytes  # 1 s, 440 Hz, 22.05 kHz stereo, made by ffmpeg/libmp3lame


@dataclass
class Server:
    base: str
    hits: Counter[str] = field(default_factory=Counter)
    release: threading.Event = field(default_factory=threading.Event)


@pytest.fixture(scope="module")
def audio_files(tmp_path_factory: pytest.TempPathFactory) -> AudioFiles:
    sox = shutil.which("sox")
    ffmpeg = shutil.which("ffmpeg")
    if sox is None or ffmpeg is None:
        pytest.fail("sox and ffmpeg are needed: apt-get install sox ffmpeg")
    out = tmp_path_factory.mktemp("audio")
    wav, mp3 = out / "tone.wav", out / "tone.mp3"
    subprocess.run(
        [sox, "-n", "-r", "16000", "-c", "1", "-b", "16", str(wav), "synth", "1", "sine", "440"],
        check=True,
        timeout=30,
    )
    subprocess.run(
        [ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
         "sine=frequency=440:duration=1:sample_rate=22050", "-ac", "2", "-c:a", "libmp3lame",
         "-b:a", "64k", str(mp3)],
        check=True,
        timeout=30,
    )  # fmt: skip
    return AudioFiles(wav=wav.read_bytes(), mp3=mp3.read_bytes())


@pytest.fixture(scope="module")
def server(audio_files: AudioFiles) -> Iterator[Server]:
    state = Server(base="")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def _send(self, status: int, body: bytes, *, length: bool = True) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            if length:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            state.hits[path] += 1
            if path == "/tone.wav":
                self._send(200, audio_files.wav)
            elif path == "/tone.mp3":
                self._send(200, audio_files.mp3)
            elif path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "/tone.mp3")
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif path == "/loop":
                self.send_response(302)
                self.send_header("Location", "/loop")
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif path == "/big-declared":
                self._send(200, b"\0" * BIG)
            elif path == "/big-undeclared":
                # HTTP/1.0 response without Content-Length: the body ends when the socket closes.
                self._send(200, b"\0" * BIG, length=False)
            elif path == "/text":
                self._send(200, b"this is not audio at all\n" * 10)
            elif path == "/slow":
                state.release.wait(10)
                self._send(200, audio_files.wav)
            else:
                self._send(404, b"not found")

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    state.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, name="test-http", daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.release.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)
        assert not thread.is_alive()


@pytest.fixture
async def fetcher(tmp_path: Path) -> AsyncIterator[AudioFetcher]:
    async with AudioFetcher(allowed_root=tmp_path, max_bytes=LIMIT, timeout=5.0) as f:
        yield f


def _seconds(pcm: bytes, rate: int) -> float:
    return len(pcm) / 2 / rate


def _dominant_hz(pcm: bytes, rate: int) -> float:
    samples = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    spectrum = np.abs(np.fft.rfft(samples))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[int(np.argmax(spectrum))])


class TestHttp:
    @pytest.mark.parametrize("rate", [8000, 16000])
    async def test_wav(self, fetcher: AudioFetcher, server: Server, rate: int) -> None:
        pcm = await fetcher.fetch(f"{server.base}/tone.wav", rate)
        assert abs(_seconds(pcm, rate) - 1.0) < 0.01
        assert abs(_dominant_hz(pcm, rate) - 440) < 5

    @pytest.mark.parametrize("rate", [8000, 16000])
    async def test_mp3_stereo_is_downmixed(
        self, fetcher: AudioFetcher, server: Server, rate: int
    ) -> None:
        pcm = await fetcher.fetch(f"{server.base}/tone.mp3", rate)
        assert 0.95 < _seconds(pcm, rate) < 1.15  # encoder padding
        assert abs(_dominant_hz(pcm, rate) - 440) < 5

    async def test_redirect_is_followed(self, fetcher: AudioFetcher, server: Server) -> None:
        pcm = await fetcher.fetch(f"{server.base}/redirect", 8000)
        assert 0.95 < _seconds(pcm, 8000) < 1.15

    async def test_cache_hit_does_not_ask_the_server_again(
        self, fetcher: AudioFetcher, server: Server
    ) -> None:
        url = f"{server.base}/tone.wav?cache-test"
        before = server.hits["/tone.wav"]
        first = await fetcher.fetch(url, 8000)
        second = await fetcher.fetch(url, 8000)
        assert second is first
        assert server.hits["/tone.wav"] == before + 1
        wide = await fetcher.fetch(url, 16000)  # rate is part of the key
        assert len(wide) == 2 * len(first)
        assert server.hits["/tone.wav"] == before + 2

    async def test_404(self, fetcher: AudioFetcher, server: Server) -> None:
        with pytest.raises(FetchError, match=r"HTTP 404 Not Found") as info:
            await fetcher.fetch(f"{server.base}/missing.wav?token=s3cret", 8000)
        assert isinstance(info.value, RemoteError)
        assert "s3cret" not in str(info.value)
        assert f"{server.base}/missing.wav?…" in str(info.value)

    async def test_declared_too_large_body(self, fetcher: AudioFetcher, server: Server) -> None:
        with pytest.raises(FetchError, match=rf"{BIG} bytes is over the {LIMIT} bytes limit"):
            await fetcher.fetch(f"{server.base}/big-declared", 8000)

    async def test_undeclared_too_large_body(self, fetcher: AudioFetcher, server: Server) -> None:
        with pytest.raises(FetchError, match=rf"body is over the {LIMIT} bytes limit"):
            await fetcher.fetch(f"{server.base}/big-undeclared", 8000)

    async def test_default_limit_is_20_mb(self) -> None:
        async with AudioFetcher() as f:
            assert f.max_bytes == 20 * 1024 * 1024

    async def test_not_audio(self, fetcher: AudioFetcher, server: Server) -> None:
        with pytest.raises(FetchError, match=r"/text: cannot decode audio"):
            await fetcher.fetch(f"{server.base}/text", 8000)

    async def test_redirect_loop(self, fetcher: AudioFetcher, server: Server) -> None:
        with pytest.raises(FetchError, match="more than 5 redirects"):
            await fetcher.fetch(f"{server.base}/loop", 8000)

    async def test_timeout(self, server: Server, tmp_path: Path) -> None:
        async with AudioFetcher(timeout=0.3) as f:
            with pytest.raises(FetchError, match="timed out"):
                await f.fetch(f"{server.base}/slow", 8000)
        async with AudioFetcher(timeout=5.0, total_timeout=0.3) as f:
            with pytest.raises(FetchError, match=r"took longer than 0\.3 s"):
                await f.fetch(f"{server.base}/slow", 8000)

    async def test_connection_refused(self, fetcher: AudioFetcher) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with pytest.raises(FetchError, match="ConnectError"):
            await fetcher.fetch(f"http://127.0.0.1:{port}/tone.wav", 8000)

    async def test_shared_client_is_not_closed(self, server: Server) -> None:
        async with httpx.AsyncClient() as client:
            async with AudioFetcher(client=client) as f:
                await f.fetch(f"{server.base}/redirect", 8000)
            assert not client.is_closed


class TestPrivateHosts:
    """Issue 11 #10: with ``allow_private_hosts`` off (the setting for a worker that is not on
    loopback), a URL whose host is loopback or private is refused before any request."""

    @pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "10.1.2.3", "[::1]", "169.254.1.1"])
    async def test_refused(self, host: str, server: Server) -> None:
        port = urlsplit(server.base).port
        before = sum(server.hits.values())
        async with AudioFetcher(allow_private_hosts=False, timeout=1.0) as f:
            with pytest.raises(FetchError, match="private or local address"):
                await f.fetch(f"http://{host}:{port}/tone.wav", 8000)
        assert sum(server.hits.values()) == before


class TestLocalFiles:
    @pytest.fixture
    def root(self, tmp_path: Path, audio_files: AudioFiles) -> Path:
        (tmp_path / "prompts").mkdir()
        (tmp_path / "prompts" / "tone.wav").write_bytes(audio_files.wav)
        (tmp_path / "prompts" / "tone two.mp3").write_bytes(audio_files.mp3)
        return tmp_path

    async def test_absolute_relative_and_file_urls(self, root: Path, fetcher: AudioFetcher) -> None:
        absolute = str(root / "prompts" / "tone.wav")
        results = [
            await fetcher.fetch(absolute, 8000),
            await fetcher.fetch("prompts/tone.wav", 8000),
            await fetcher.fetch(f"file://{absolute}", 8000),
            await fetcher.fetch(f"file://localhost{absolute}", 8000),
        ]
        assert abs(_seconds(results[0], 8000) - 1.0) < 0.01
        assert all(r == results[0] for r in results)
        mp3 = await fetcher.fetch(f"file://{root}/prompts/tone%20two.mp3", 16000)
        assert abs(_dominant_hz(mp3, 16000) - 440) < 5

    @pytest.mark.parametrize("path", ["/etc/passwd", "../outside.wav", "prompts/../../x.wav"])
    async def test_outside_the_root_is_refused(self, path: str, fetcher: AudioFetcher) -> None:
        with pytest.raises(FetchError, match="outside the prompts folder") as caught:
            await fetcher.fetch(path, 8000)
        assert fetcher.allowed_root is not None
        assert str(fetcher.allowed_root) not in str(caught.value)  # issue 11 #10: no path shown

    async def test_file_url_outside_the_root_is_refused(self, fetcher: AudioFetcher) -> None:
        with pytest.raises(FetchError, match="outside the prompts folder"):
            await fetcher.fetch("file:///etc/passwd", 8000)

    async def test_symlink_out_of_the_root_is_refused(
        self, root: Path, fetcher: AudioFetcher, tmp_path_factory: pytest.TempPathFactory
    ) -> None:
        elsewhere = tmp_path_factory.mktemp("elsewhere") / "secret.wav"
        elsewhere.write_bytes((root / "prompts" / "tone.wav").read_bytes())
        (root / "prompts" / "link.wav").symlink_to(elsewhere)
        with pytest.raises(FetchError, match="outside the prompts folder"):
            await fetcher.fetch("prompts/link.wav", 8000)

    async def test_no_root_means_no_local_files(self, root: Path) -> None:
        async with AudioFetcher() as f:
            with pytest.raises(FetchError, match="local files are not allowed"):
                await f.fetch(str(root / "prompts" / "tone.wav"), 8000)

    async def test_missing_file_and_directory(self, root: Path, fetcher: AudioFetcher) -> None:
        with pytest.raises(FetchError, match="no such file"):
            await fetcher.fetch("prompts/nope.wav", 8000)
        with pytest.raises(FetchError, match="not a regular file"):
            await fetcher.fetch("prompts", 8000)

    async def test_too_large_file(self, root: Path, fetcher: AudioFetcher) -> None:
        (root / "huge.wav").write_bytes(b"\0" * BIG)
        with pytest.raises(FetchError, match=f"over the {LIMIT} bytes limit"):
            await fetcher.fetch("huge.wav", 8000)

    async def test_not_audio(self, root: Path, fetcher: AudioFetcher) -> None:
        (root / "notes.wav").write_text("not audio")
        with pytest.raises(FetchError, match=r"notes\.wav: cannot decode audio"):
            await fetcher.fetch("notes.wav", 8000)

    async def test_cache_is_keyed_by_modification_time(
        self, root: Path, fetcher: AudioFetcher, audio_files: AudioFiles
    ) -> None:
        first = await fetcher.fetch("prompts/tone.wav", 8000)
        assert await fetcher.fetch("prompts/tone.wav", 8000) is first
        target = root / "prompts" / "tone.wav"
        target.write_bytes(audio_files.mp3)
        stat = target.stat()
        os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
        second = await fetcher.fetch("prompts/tone.wav", 8000)
        assert second != first
        assert fetcher.cache.hits == 1

    def test_root_must_be_a_directory(self, root: Path) -> None:
        with pytest.raises(ValueError, match="not a directory"):
            AudioFetcher(allowed_root=root / "prompts" / "tone.wav")


class TestOtherSources:
    @pytest.mark.parametrize(
        ("source", "message"),
        [
            ("ftp://example.com/a.wav", "unsupported URL scheme 'ftp'"),
            ("data:audio/wav;base64,AAAA", "unsupported URL scheme 'data'"),
            ("file://otherhost/a.wav", "file URLs on other hosts are not supported"),
            ("", "not a valid path"),
            ("http://127.0.0.1:99999/a.wav", r"<invalid URL>: invalid URL \(Port out of range"),
            ("http://[::1/a.wav", "<invalid URL>: invalid URL"),
        ],
    )
    async def test_refused(self, source: str, message: str, fetcher: AudioFetcher) -> None:
        with pytest.raises(FetchError, match=message):
            await fetcher.fetch(source, 8000)

    async def test_credentials_are_not_shown(self, fetcher: AudioFetcher) -> None:
        with socket.socket() as sock:  # a port nobody listens on
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        with pytest.raises(FetchError) as info:
            await fetcher.fetch(f"http://user:pw-s3cret@127.0.0.1:{port}/a.wav?sig=x", 8000)
        assert "s3cret" not in str(info.value)
        assert f"http://127.0.0.1:{port}/a.wav?…" in str(info.value)

    async def test_bad_sample_rate(self, fetcher: AudioFetcher) -> None:
        with pytest.raises(ValueError, match="sample_rate"):
            await fetcher.fetch("x.wav", 0)
