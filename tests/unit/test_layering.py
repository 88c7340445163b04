"""The architecture's seams, checked from the source: a session sees its leg only through
``worker.legs`` (never ``worker.sip`` or ``worker.ari``), and ``media`` does no I/O."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def imported_modules(folder: Path) -> dict[str, set[str]]:
    """Every module each ``.py`` file under ``folder`` imports (absolute names)."""
    out: dict[str, set[str]] = {}
    for path in sorted(folder.rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        out[str(path.relative_to(ROOT))] = names
    return out


class TestArchitectureSeams:
    def test_session_sees_legs_only_through_worker_legs(self) -> None:
        offending = {
            path: sorted(
                n for n in names if n.startswith(("worker.sip", "worker.ari", "worker.rtp"))
            )
            for path, names in imported_modules(ROOT / "worker" / "session").items()
        }
        assert {path: names for path, names in offending.items() if names} == {}

    def test_ingresses_do_not_know_each_other_or_sessions(self) -> None:
        """``worker.ari`` and ``worker.sip`` meet only in ``worker.app`` and ``worker.legs``."""
        for ingress, other in (("ari", "worker.sip"), ("sip", "worker.ari")):
            offending = {
                path: sorted(n for n in names if n.startswith((other, "worker.session")))
                for path, names in imported_modules(ROOT / "worker" / ingress).items()
            }
            assert {path: names for path, names in offending.items() if names} == {}, ingress

    def test_media_does_no_io(self) -> None:
        forbidden = ("asyncio", "socket", "worker", "time", "uvloop", "websockets")
        offending = {
            path: sorted(n for n in names if n.split(".")[0] in forbidden)
            for path, names in imported_modules(ROOT / "media").items()
        }
        assert {path: names for path, names in offending.items() if names} == {}

    def test_sip_core_does_no_io(self) -> None:
        forbidden = ("asyncio", "socket", "time", "uvloop")
        sans_io = ("core", "message", "transaction", "dialog", "auth", "sdp", "limits")
        for name in sans_io:
            names = imported_modules(ROOT / "worker" / "sip")[f"worker/sip/{name}.py"]
            assert sorted(n for n in names if n.split(".")[0] in forbidden) == [], name
