"""The worker image's HEALTHCHECK: asks the running worker itself, per ingress in its settings.

- "sip" in ingress: a SIP OPTIONS to the worker's own SIP port (UDP when enabled, else TCP) must
  get a response within 3 s. The worker answers OPTIONS from its event loop (200, or 503 when
  rate limited; either proves it alive), so a hung or dead worker fails.
- "ari" in ingress: a process of this container must hold an established TCP connection to the
  port of ``ari.url`` (the ARI events WebSocket); found through /proc, which the worker's own user
  may read. A worker that lost Asterisk reconnects with back-off, so after a few failed checks in
  a row the container is marked unhealthy, as it should be.

Exit 0 healthy, 1 not (with the reason on stdout, which Docker keeps with the check). The
settings come from the same place the worker's do (``AISPINNER_CONFIG``, ``AISPINNER_*``).
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import socket
import sys
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit

TIMEOUT_S = 3.0
ESTABLISHED = "01"
"""TCP state column of /proc/net/tcp for an established connection."""


def probe_host(host: str) -> str:
    """Where to send the probe: a wildcard bind is reachable on loopback."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if address.is_unspecified:
        return "::1" if address.version == 6 else "127.0.0.1"
    return host


def options_request(
    host: str, port: int, transport: str, local: tuple[str, int], call_id: str
) -> bytes:
    """An out-of-dialog OPTIONS (RFC 3261 §11) from ``local`` to the worker."""

    def hostport(h: str, p: int) -> str:
        return f"[{h}]:{p}" if ":" in h else f"{h}:{p}"

    tag = secrets.token_hex(4)
    branch = "z9hG4bK" + secrets.token_hex(8)
    lines = [
        f"OPTIONS sip:healthcheck@{hostport(host, port)} SIP/2.0",
        f"Via: SIP/2.0/{transport.upper()} {hostport(*local)};branch={branch};rport",
        "Max-Forwards: 70",
        f"From: <sip:healthcheck@{hostport(*local)}>;tag={tag}",
        f"To: <sip:healthcheck@{hostport(host, port)}>",
        f"Call-ID: {call_id}",
        "CSeq: 1 OPTIONS",
        "Accept: application/sdp",
        "Content-Length: 0",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def is_answer(data: bytes, call_id: str) -> bool:
    """Whether ``data`` is a SIP response to our request (any status)."""
    head = data.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
    lines = head.split("\r\n")
    if not lines[0].startswith("SIP/2.0 "):
        return False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() in ("call-id", "i") and value.strip() == call_id:
            return True
    return False


def check_sip(host: str, port: int, transports: Iterable[str]) -> str | None:
    """None when the worker answered an OPTIONS, else why not."""
    target = probe_host(host)
    transport = "udp" if "udp" in transports else "tcp"
    call_id = f"{secrets.token_hex(8)}@healthcheck"
    family = socket.AF_INET6 if ":" in target else socket.AF_INET
    kind = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
    try:
        with socket.socket(family, kind) as sock:
            sock.settimeout(TIMEOUT_S)
            sock.connect((target, port))
            local = sock.getsockname()[:2]
            sock.sendall(options_request(target, port, transport, local, call_id))
            data = sock.recv(65535)
    except OSError as exc:
        return f"SIP OPTIONS to {transport} {target}:{port}: {str(exc) or type(exc).__name__}"
    if not is_answer(data, call_id):
        return f"SIP OPTIONS to {transport} {target}:{port}: no SIP response"
    return None


def socket_inodes(proc: Path) -> set[int]:
    """Inodes of the sockets this container's processes hold (those we may look at)."""
    inodes: set[int] = set()
    for fd_dir in proc.glob("[0-9]*/fd"):
        try:
            links = [os.readlink(fd) for fd in fd_dir.iterdir()]
        except OSError:
            continue  # gone, or another user's
        for link in links:
            if link.startswith("socket:[") and link.endswith("]"):
                inodes.add(int(link[len("socket:[") : -1]))
    return inodes


def established_to(tables: Iterable[str], port: int, inodes: set[int]) -> bool:
    """Whether /proc/net/tcp{,6} text lists an established connection to remote ``port``
    owned by one of ``inodes``."""
    for table in tables:
        for line in table.splitlines()[1:]:
            fields = line.split()
            if len(fields) < 10:
                continue
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if remote_port == port and fields[3] == ESTABLISHED and int(fields[9]) in inodes:
                return True
    return False


def check_ari(url: str, proc: Path = Path("/proc")) -> str | None:
    """None when a process here is connected to ARI's port, else why not."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    tables = []
    for name in ("tcp", "tcp6"):
        try:
            tables.append((proc / "net" / name).read_text())
        except OSError:
            continue
    if not established_to(tables, port, socket_inodes(proc)):
        return f"no connection to ARI at {url} (port {port})"
    return None


def main() -> int:
    from worker.config import load_settings
    from worker.errors import ConfigError

    try:
        settings = load_settings()
    except ConfigError as exc:
        print(exc)
        return 1
    problems = []
    if "sip" in settings.ingress:
        problems.append(check_sip(settings.sip.host, settings.sip.port, settings.sip.transports))
    if "ari" in settings.ingress:
        problems.append(check_ari(settings.ari.url))
    failed = [p for p in problems if p is not None]
    print("; ".join(failed) if failed else f"ok ({', '.join(settings.ingress)})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
