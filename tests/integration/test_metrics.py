"""``GET /metrics`` on a running worker with its API and a real PostgreSQL, scraped with httpx
while real SIPp calls go through it: the active-call gauge during an echo call, the setup,
hangup, RTP, recorder and tick figures after it, a failure counted by its cause, the outbox
figures; and ``MetricsServer`` serving the same text without the API (and a merged one).

The worker runs in this test process and counts into the process's registry, which earlier
tests may have counted into too: every check is a difference between two scrapes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.harness import agent_route, assert_sipp_ok, caller, running_worker, wait_results
from tests.integration.test_hub import SECRET, api_port
from tests.sipp import free_port
from worker.app import Worker
from worker.metrics import CONTENT_TYPE, MetricsServer, WorkerMetrics, merge_expositions

pytestmark = pytest.mark.sipp

WAIT = 10.0
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition by (name, labels)."""
    return {
        (sample.name, frozenset(sample.labels.items())): float(sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def at(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(client: httpx.AsyncClient, worker: Worker) -> Samples:
    response = await client.get(f"http://127.0.0.1:{api_port(worker)}/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == CONTENT_TYPE
    return parse(response.text)


class TestMetricsEndpoint:
    async def test_echo_call_seen_live_then_counted(
        self, tmp_path: Path, database_url: str, sipp_share: Path
    ) -> None:
        routes = [{"match": "echo", "action": "echo", "record": True}]
        async with (
            running_worker(
                tmp_path / "data", routes, database_url=database_url, jwt_secret=SECRET
            ) as worker,
            httpx.AsyncClient(timeout=WAIT) as client,
        ):
            before = await scrape(client, worker)
            assert at(before, "aispinner_outbox_database_up") == 1  # the store is on
            sipp = caller(tmp_path / "sipp", worker, "uac_talk_bye", "echo", duration_ms=3000)
            async with sipp:
                during = before
                loop = asyncio.get_running_loop()
                deadline = loop.time() + WAIT
                while (
                    at(during, "aispinner_rtp_received_packets_total")
                    - at(before, "aispinner_rtp_received_packets_total")
                    < 25
                ):  # half a second of the caller's audio, read from the live call
                    assert loop.time() < deadline, "no live RTP figures within the wait"
                    await asyncio.sleep(0.1)
                    during = await scrape(client, worker)
                result = await sipp.wait()
            assert_sipp_ok(result)
            (done,) = await wait_results(worker, 1)
            after = await scrape(client, worker)
            # call.started, in-progress, completed, call.done: written by the outbox shortly.
            written = "aispinner_outbox_written_events_total"
            while at(after, written) - at(before, written) < 4:
                assert loop.time() < deadline + WAIT, "the call's events were not written"
                await asyncio.sleep(0.1)
                after = await scrape(client, worker)

        def grew(name: str, **labels: str) -> float:
            return at(after, name, **labels) - at(before, name, **labels)

        assert at(during, "aispinner_calls_active") - at(before, "aispinner_calls_active") == 1
        assert at(after, "aispinner_calls_active") == at(before, "aispinner_calls_active")
        assert grew("aispinner_call_setups_total", direction="inbound") == 1
        assert grew("aispinner_call_hangups_total", direction="inbound", cause="remote-bye") == 1
        assert done.media is not None
        # SIPp plays its capture for the whole call and the echo sends a frame every tick.
        assert grew("aispinner_rtp_received_packets_total") == done.media.packets_in > 100
        assert grew("aispinner_rtp_sent_packets_total") == done.media.packets_out > 100
        assert grew("aispinner_rtp_jitter_seconds_count") == 1
        assert grew("aispinner_recorder_frames_total") > 100
        assert grew("aispinner_recorder_encode_seconds_total") > 0
        assert grew("aispinner_media_tick_duration_seconds_count") > 100

    async def test_unreachable_agent_counted_as_a_failure_by_cause(
        self, tmp_path: Path, database_url: str
    ) -> None:
        routes = [agent_route("*", f"ws://127.0.0.1:{free_port()}/app#rc=0", record=False)]
        async with (
            running_worker(
                tmp_path / "data", routes, database_url=database_url, jwt_secret=SECRET
            ) as worker,
            httpx.AsyncClient(timeout=WAIT) as client,
        ):
            before = await scrape(client, worker)
            result = await caller(tmp_path / "sipp", worker, "uac_rejected", "+15550004001").run()
            (done,) = await wait_results(worker, 1)
            after = await scrape(client, worker)
        assert_sipp_ok(result)
        assert (done.status, done.cause) == ("failed", "agent-unreachable")
        failures = "aispinner_call_failures_total"
        labels = {"direction": "inbound", "cause": "agent-unreachable"}
        assert at(after, failures, **labels) - at(before, failures, **labels) == 1
        setups = at(after, "aispinner_call_setups_total", direction="inbound")
        assert setups - at(before, "aispinner_call_setups_total", direction="inbound") == 1

    async def test_no_token_needed_and_listed_in_openapi(
        self, tmp_path: Path, database_url: str
    ) -> None:
        async with (
            running_worker(
                tmp_path / "data", [], database_url=database_url, jwt_secret=SECRET
            ) as worker,
            httpx.AsyncClient(timeout=WAIT) as client,
        ):
            base = f"http://127.0.0.1:{api_port(worker)}"
            metrics = await client.get(f"{base}/metrics")  # no Authorization header
            journal = await client.get(f"{base}/telephony/journal")
            schema = (await client.get(f"{base}/openapi.json")).json()
        assert metrics.status_code == 200
        assert journal.status_code == 401  # the rest of the API still wants a token
        assert "/metrics" in schema["paths"]


class TestMetricsServer:
    async def test_serves_metrics_without_the_api(self) -> None:
        metrics = WorkerMetrics(process=False)
        metrics.call_setups.labels("outbound").inc()
        server = MetricsServer(metrics.render, "127.0.0.1", 0)
        await server.start()
        try:
            async with httpx.AsyncClient(timeout=WAIT) as client:
                base = f"http://127.0.0.1:{server.port}"
                ok = await client.get(f"{base}/metrics")
                head = await client.head(f"{base}/metrics")
                elsewhere = await client.get(f"{base}/")
                posted = await client.post(f"{base}/metrics", content=b"x")
        finally:
            await server.close()
        assert ok.status_code == 200
        assert ok.headers["content-type"] == CONTENT_TYPE
        assert at(parse(ok.text), "aispinner_call_setups_total", direction="outbound") == 1
        assert (head.status_code, head.content) == (200, b"")
        assert int(head.headers["content-length"]) == len(ok.content)
        assert elsewhere.status_code == 404
        assert posted.status_code == 405
        assert posted.headers["allow"] == "GET, HEAD"

    async def test_serves_a_merge_of_several_processes(self) -> None:
        """What a parent of several worker processes serves: an async render that gathers each
        child's exposition and merges them with a ``process`` label."""
        children = [WorkerMetrics(process=False) for _ in range(2)]
        children[1].call_setups.labels("inbound").inc(3)

        async def render() -> bytes:
            await asyncio.sleep(0)  # as if asking each child over its socket
            return merge_expositions({str(i): m.render() for i, m in enumerate(children)})

        server = MetricsServer(render, "127.0.0.1", 0)
        await server.start()
        try:
            async with httpx.AsyncClient(timeout=WAIT) as client:
                response = await client.get(f"http://127.0.0.1:{server.port}/metrics")
        finally:
            await server.close()
        samples = parse(response.text)
        setups = "aispinner_call_setups_total"
        assert at(samples, setups, direction="inbound", process="0") == 0
        assert at(samples, setups, direction="inbound", process="1") == 3

    async def test_a_taken_port_raises(self) -> None:
        render = WorkerMetrics(process=False).render
        first = MetricsServer(render, "127.0.0.1", 0)
        await first.start()
        try:
            second = MetricsServer(render, "127.0.0.1", first.port)
            with pytest.raises(OSError, match=r"(?i)in use"):
                await second.start()
        finally:
            await first.close()
