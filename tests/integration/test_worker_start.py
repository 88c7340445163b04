"""Starting the worker where its SIP port is taken fails with a message that names the setting
to change, and leaves nothing running."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.sipp import free_port
from worker.app import StartError, Worker
from worker.config import load_settings
from worker.session.session import tick_failed


class TestTakenSipPort:
    async def test_the_error_names_the_setting(self, tmp_path: Path) -> None:
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as squatter:
            squatter.bind(("127.0.0.1", port))
            rtp = free_port(span=22)
            settings = load_settings(
                None,
                data_dir=tmp_path,
                sip={"port": port},
                rtp={"port_min": rtp, "port_max": rtp + 20},
                store=False,
            )
            worker = Worker(settings)
            with pytest.raises(StartError) as caught:
                await worker.start()
        message = str(caught.value)
        assert f"127.0.0.1:{port}" in message
        assert "sip.port" in message
        assert "AISPINNER_SIP__PORT" in message
        assert worker.sessions == {}


class TestTheMediaPacer:
    async def test_a_session_whose_tick_raises_ends_its_call(self, tmp_path: Path) -> None:
        """The worker's pacer hands a raising tick to ``tick_failed`` (which hangs that call
        up: tests/unit/test_session_core.py), not to its own log-and-drop."""
        rtp = free_port(span=22)
        settings = load_settings(
            None,
            data_dir=tmp_path,
            sip={"port": free_port()},
            rtp={"port_min": rtp, "port_max": rtp + 20},
            store=False,
        )
        worker = Worker(settings)
        await worker.start()
        try:
            assert worker.pacer is not None
            assert worker.pacer.on_error is tick_failed
        finally:
            await worker.close()
