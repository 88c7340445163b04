"""The load test's figures from what its parts collected, sans-I/O: marker pairing and latency,
the hold window, CPU and memory per call, loss both ways, pacing jitter, setup times, failures.

Definitions (the README's "Load test" section explains them to readers):

* A marker's **caller → agent** latency is the agent's receipt of the frame holding its onset
  minus the probe's send of its first packet; **agent → caller** is the probe's receipt of the
  echoed onset minus the agent's receipt; **round trip** is the probe's receipt minus its send.
  Each heard marker is paired with the latest marker of its id sent before it (ids repeat every
  ``len(FREQUENCIES)`` markers, 4 s), and each sent marker with its first hearing.
* The **hold window** is the part of the run with every planned call up (the timeline's samples
  with at least ``calls`` concurrent calls; if the load never got there, those within 90 % of
  the highest count). Headline latency, CPU and memory figures are taken in it.
* **CPU per call** is the worker's mean CPU (% of one core) over the hold window divided by the
  calls; the **slope** is the least-squares fit of CPU against concurrent calls over the whole
  run up to the end of the hold (the marginal cost of a call, without the idle baseline).
  Memory likewise, from the PSS over the idle PSS measured before the first call.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from worker.legs import FRAME_MS
from worker.loadtest.marker import FREQUENCIES

MARKER_PERIOD_S = 0.5
PAIRING_WINDOW_S = len(FREQUENCIES) * MARKER_PERIOD_S
HOLD_FRACTION = 0.9


def percentiles(values: Iterable[float], digits: int = 2) -> dict[str, Any]:
    """count, p50, p99, max and mean of ``values`` (None for each when there are none)."""
    array = np.asarray(list(values), dtype=np.float64)
    if not array.size:
        return {"count": 0, "p50": None, "p99": None, "max": None, "mean": None}
    return {
        "count": int(array.size),
        "p50": round(float(np.percentile(array, 50)), digits),
        "p99": round(float(np.percentile(array, 99)), digits),
        "max": round(float(array.max()), digits),
        "mean": round(float(array.mean()), digits),
    }


def pair_markers(
    sent: Sequence[tuple[int, float]],
    heard: Iterable[tuple[int, float]],
    window_s: float = PAIRING_WINDOW_S,
) -> dict[int, float]:
    """For each sent marker (``count``, send time), the time it was first heard, from
    ``heard`` (``marker_id``, time): the latest marker of that id sent before the hearing and
    within ``window_s`` of it."""
    by_id: dict[int, list[tuple[float, int]]] = {}
    for count, at in sent:
        by_id.setdefault(count % len(FREQUENCIES), []).append((at, count))
    for entries in by_id.values():
        entries.sort()
    out: dict[int, float] = {}
    for marker, at in sorted(heard, key=lambda h: h[1]):
        best = None
        for sent_at, count in by_id.get(marker, ()):
            if sent_at > at:
                break
            best = (sent_at, count)
        if best is None or at - best[0] > window_s:
            continue
        out.setdefault(best[1], at)
    return out


@dataclass(frozen=True, slots=True)
class LatencySample:
    probe: int
    marker: int
    sent_at: float
    to_agent_ms: float | None
    from_agent_ms: float | None
    round_trip_ms: float | None


def latency_samples(
    probes: Sequence[Mapping[str, Any]], agent_markers: Sequence[Mapping[str, Any]]
) -> list[LatencySample]:
    """One sample per marker a probe sent that was heard at the agent or back at the probe."""
    out: list[LatencySample] = []
    for call in probes:
        index = int(call["index"])
        sent = [(int(c), float(t)) for c, t in call.get("markers_sent") or ()]
        at_agent = pair_markers(
            sent,
            ((int(m["marker_id"]), float(m["at"])) for m in agent_markers if m["probe"] == index),
        )
        echoed = pair_markers(sent, ((int(e[0]), float(e[1])) for e in call.get("echoes") or ()))
        for count, sent_at in sent:
            agent = at_agent.get(count)
            back = echoed.get(count)
            if agent is None and back is None:
                continue
            out.append(
                LatencySample(
                    index,
                    count,
                    sent_at,
                    None if agent is None else round((agent - sent_at) * 1000, 3),
                    None if agent is None or back is None else round((back - agent) * 1000, 3),
                    None if back is None else round((back - sent_at) * 1000, 3),
                )
            )
    return out


def hold_window(timeline: Sequence[Mapping[str, Any]], planned: int) -> tuple[float, float] | None:
    """(first, last) ``at`` of the samples with every planned call up (see the module doc)."""
    counts = [int(s["calls"]) for s in timeline]
    if not counts or max(counts) <= 0:
        return None
    floor = planned if max(counts) >= planned else HOLD_FRACTION * max(counts)
    held = [float(s["at"]) for s in timeline if int(s["calls"]) >= floor]
    return (held[0], held[-1]) if held else None


def calls_at(timeline: Sequence[Mapping[str, Any]], at: float) -> int | None:
    """Concurrent calls at ``at``: the nearest sample's count."""
    if not timeline:
        return None
    nearest = min(timeline, key=lambda s: abs(float(s["at"]) - at))
    return int(nearest["calls"])


def slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """The least-squares slope of ``ys`` against ``xs``; None without two distinct ``xs``."""
    if len(xs) < 2 or len(set(xs)) < 2:
        return None
    return float(np.polyfit(np.asarray(xs, dtype=np.float64), np.asarray(ys), 1)[0])


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def resources(
    timeline: Sequence[Mapping[str, Any]],
    idle: Mapping[str, Any] | None,
    window: tuple[float, float] | None,
    calls: int,
) -> dict[str, Any]:
    """The worker's CPU and memory: at the hold, per call, and the fitted cost of a call (fitted
    over the ramp up and the hold: memory is not given back as calls end)."""
    fitted = [s for s in timeline if window is None or float(s["at"]) <= window[1]]
    cpu_points = [
        (int(s["calls"]), float(s["worker_cpu_percent"]))
        for s in fitted
        if s.get("worker_cpu_percent") is not None
    ]
    pss_points = [
        (int(s["calls"]), float(s["worker_pss_kb"]))
        for s in fitted
        if s.get("worker_pss_kb") is not None
    ]
    if not cpu_points and not pss_points:
        return {"measured": False}
    held = [s for s in timeline if window is not None and window[0] <= float(s["at"]) <= window[1]]
    hold_cpu = _mean(
        [float(s["worker_cpu_percent"]) for s in held if s.get("worker_cpu_percent") is not None]
    )
    hold_pss = _mean(
        [float(s["worker_pss_kb"]) for s in held if s.get("worker_pss_kb") is not None]
    )
    hold_calls = _mean([float(s["calls"]) for s in held]) or float(calls)
    idle_cpu = None if idle is None else idle.get("worker_cpu_percent")
    idle_pss = None if idle is None else idle.get("worker_pss_kb")
    cpu_slope = slope([x for x, _ in cpu_points], [y for _, y in cpu_points])
    pss_slope = slope([x for x, _ in pss_points], [y for _, y in pss_points])
    return {
        "measured": True,
        "cpu_idle_percent": _round(idle_cpu),
        "cpu_hold_percent": _round(hold_cpu),
        "cpu_per_call_percent": _round(None if hold_cpu is None else hold_cpu / hold_calls, 3),
        "cpu_slope_percent_per_call": _round(cpu_slope, 3),
        "cpu_peak_percent": _round(max((y for _, y in cpu_points), default=None)),
        "pss_idle_kb": None if idle_pss is None else int(idle_pss),
        "pss_hold_kb": None if hold_pss is None else int(hold_pss),
        "pss_per_call_kb": None
        if hold_pss is None or idle_pss is None
        else _round((hold_pss - float(idle_pss)) / hold_calls, 1),
        "pss_slope_kb_per_call": _round(pss_slope, 1),
        "hold_calls": _round(hold_calls, 1),
    }


def loss_figures(
    probes: Sequence[Mapping[str, Any]], call_records: Sequence[Mapping[str, Any]] | None
) -> dict[str, Any]:
    """Loss both ways: at the worker for every call (its jitter buffer's counters, when its log
    is at hand), and for the probes from outside (RTCP receiver reports; sequence numbers)."""
    out: dict[str, Any] = {}
    if call_records is not None:
        received = lost = late = discarded = other = 0
        should_send = not_sent = 0
        for record in call_records:
            # Audio packets the jitter buffer took in: late and discarded ones among them.
            audio = int(record.get("rtp_played") or 0)
            # Packets in that were not audio (RFC 4733 events: the worker no longer counts
            # the sequence numbers they take as lost audio, media/stream.py), for the record.
            other += max(0, int(record.get("rtp_in") or 0) - audio)
            received += audio
            lost += int(record.get("rtp_lost") or 0)
            late += int(record.get("rtp_late") or 0)
            discarded += int(record.get("rtp_overflow") or 0)
            # Towards the caller: one packet every 20 ms from the answer to the end. A tick
            # the worker skipped (its loop stalled) sends nothing, and the sequence numbers
            # stay contiguous: only the count against the clock shows it. Whole periods only:
            # a call of 39.61 s has 1,980 of them, and whether the tick of the 1,981st came
            # before the hangup depends on where in the 20 ms the call's tick runs.
            expected = int(float(record.get("seconds") or 0.0) * 1000 / FRAME_MS)
            should_send += expected
            not_sent += max(0, expected - int(record.get("rtp_out") or 0))
        gone = lost + late + discarded
        out["caller_to_worker"] = {
            "source": "the worker's per-call jitter buffer counters (every call)",
            "calls": len(call_records),
            "packets": received + lost,
            "lost": gone,
            "lost_in_network": lost,
            # Late packets came after their playout and were dropped; discarded ones
            # overflowed the jitter buffer (the worker fell behind): lost to the caller's
            # audio all the same.
            "late": late,
            "discarded": discarded,
            "non_audio_packets": other,
            "percent": round(100 * gone / (received + lost), 4) if received + lost else None,
        }
        out["worker_to_caller"] = {
            "source": "the worker's per-call counters: packets sent against one per 20 ms "
            "from the answer to the end (every call)",
            "calls": len(call_records),
            "packets": should_send,
            "lost": not_sent,
            "percent": round(100 * not_sent / should_send, 4) if should_send else None,
        }
    expected = lost_rtcp = 0
    reported = 0
    for call in probes:
        rtcp = call.get("rtcp")
        if not rtcp:
            continue
        reported += 1
        first = int(call["first_sequence"])
        expected += int(rtcp["highest_sequence"]) - first + 1
        lost_rtcp += max(0, int(rtcp["cumulative_lost"]))
    out["caller_to_worker_probes"] = {
        "source": "the far end's RTCP receiver reports about the probes' streams (last report)",
        "calls": reported,
        "packets": expected,
        "lost": lost_rtcp,
        "percent": round(100 * lost_rtcp / expected, 4) if expected else None,
    }
    got = [call["received"] for call in probes if call.get("received")]
    expected_back = sum(int(r["expected"]) for r in got)
    lost_back = sum(int(r["lost"]) for r in got)
    out["worker_to_caller_probes"] = {
        "source": "sequence numbers of the RTP the probes received",
        "calls": len(got),
        "packets": expected_back,
        "lost": lost_back,
        "percent": round(100 * lost_back / expected_back, 4) if expected_back else None,
    }
    return out


def summarize(
    *,
    options: Mapping[str, Any],
    timeline: Sequence[Mapping[str, Any]],
    idle: Mapping[str, Any] | None,
    sipp: Mapping[str, Any] | None,
    setup_ms: Sequence[float],
    probes: Sequence[Mapping[str, Any]],
    probes_ran: bool,
    agent_markers: Sequence[Mapping[str, Any]],
    agent: Mapping[str, Any] | None,
    call_records: Sequence[Mapping[str, Any]] | None,
    digits_per_call: int,
) -> dict[str, Any]:
    """Every figure of the run (the JSON's body, less what ``run`` adds about the run itself)."""
    calls = int(options["calls"])
    window = hold_window(timeline, calls)
    samples = latency_samples(probes, agent_markers)

    def in_hold(sample: LatencySample) -> bool:
        return window is not None and window[0] <= sample.sent_at <= window[1]

    held = [s for s in samples if in_hold(s)]
    chosen = held or samples

    def latency(of: Sequence[LatencySample]) -> dict[str, Any]:
        return {
            "caller_to_agent": percentiles(s.to_agent_ms for s in of if s.to_agent_ms is not None),
            "agent_to_caller": percentiles(
                s.from_agent_ms for s in of if s.from_agent_ms is not None
            ),
            "round_trip": percentiles(s.round_trip_ms for s in of if s.round_trip_ms is not None),
        }

    pacing = [
        d for call in probes for d in (call.get("received") or {}).get("pacing_deviation_ms", ())
    ]
    probe_failures = [
        {"probe": call["index"], "reason": call.get("failure")}
        for call in probes
        if call.get("failure") or not call.get("answered")
    ]
    probes_planned = int(options["probes"])
    bulk_planned = calls - probes_planned
    bulk_ok = int(sipp["successful"]) if sipp else 0
    # A call SIPp never completed (it was stopped, or timed out) failed too.
    bulk_failed = max(int(sipp["failed"]) if sipp else 0, bulk_planned - bulk_ok)
    probes_ok = sum(1 for call in probes if call.get("answered") and not call.get("failure"))
    failed = bulk_failed + (probes_planned - probes_ok if probes_ran else 0)
    dtmf_sent = bulk_ok * digits_per_call
    bulk_records = None
    if call_records is not None:
        bulk_records = [
            r for r in call_records if not str(r.get("call_id", "")).startswith("loadtest-probe-")
        ]
    timeline_out = [
        {
            **s,
            "t": round(float(s["t"]), 2),
            "at": round(float(s["at"]), 3),
            "hold": window is not None and window[0] <= float(s["at"]) <= window[1],
            "phase": _phase(window, float(s["at"])),
        }
        for s in timeline
    ]
    return {
        "calls": {
            "planned": calls,
            "bulk_planned": bulk_planned,
            "probes_planned": probes_planned,
            "successful": bulk_ok + probes_ok,
            "failed": failed,
            "bulk_successful": bulk_ok,
            "bulk_failed": bulk_failed,
            "probes_successful": probes_ok,
            "probe_failures": probe_failures,
            "peak_concurrent": max((int(s["calls"]) for s in timeline), default=0),
        },
        "hold_window": None
        if window is None
        else {"start_s": _relative(timeline, window[0]), "end_s": _relative(timeline, window[1])},
        "setup_ms": percentiles(setup_ms),
        "resources": resources(timeline, idle, window, calls),
        "latency_ms": {
            "window": "hold" if held else "whole run",
            **latency(chosen),
        },
        "latency_whole_run_ms": latency(samples),
        "pacing_jitter_ms": {
            **percentiles(pacing, 3),
            "rfc3550_max": max(
                (float(c["received"]["rfc3550_jitter_ms"]) for c in probes if c.get("received")),
                default=None,
            ),
        },
        "loss": loss_figures(probes, call_records),
        "dtmf": {
            "sent": dtmf_sent,
            "received_by_worker": None
            if bulk_records is None
            else sum(len(str(r.get("dtmf") or "")) for r in bulk_records),
            "received_by_agent": None if agent is None else int(agent.get("dtmf_digits", 0)),
        },
        "agent": None if agent is None else {k: v for k, v in agent.items() if k != "connections"},
        "timeline": timeline_out,
        "latency_samples": [
            {
                "t": _relative(timeline, s.sent_at),
                "calls": calls_at(timeline, s.sent_at),
                "probe": s.probe,
                "marker": s.marker,
                "caller_to_agent_ms": s.to_agent_ms,
                "agent_to_caller_ms": s.from_agent_ms,
                "round_trip_ms": s.round_trip_ms,
                "hold": in_hold(s),
            }
            for s in samples
        ],
    }


def _phase(window: tuple[float, float] | None, at: float) -> str:
    if window is None or at < window[0]:
        return "ramp up"
    return "hold" if at <= window[1] else "ramp down"


def _relative(timeline: Sequence[Mapping[str, Any]], at: float) -> float | None:
    if not timeline:
        return None
    first = timeline[0]
    return round(at - float(first["at"]) + float(first["t"]), 3)
