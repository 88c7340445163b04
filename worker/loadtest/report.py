"""The load test's outputs in its ``--out`` folder: ``results.json`` (every figure, the timeline
and the latency samples), PNG plots (CPU, memory and latency against concurrent calls, a latency
histogram, the run's timeline) drawn with matplotlib's object API (no pyplot, no display), and
``report.md``, a short markdown report with the headline figures and the plots."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

PLOTS = {
    "cpu": "cpu_vs_calls.png",
    "memory": "memory_vs_calls.png",
    "latency": "latency_vs_calls.png",
    "histogram": "latency_histogram.png",
    "timeline": "timeline.png",
}
_SERIES = (
    ("round_trip_ms", "round trip", "tab:purple"),
    ("caller_to_agent_ms", "caller → agent", "tab:blue"),
    ("agent_to_caller_ms", "agent → caller", "tab:orange"),
)


def write_json(results: Mapping[str, Any], out: Path) -> Path:
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return path


def _figure() -> tuple[Figure, Axes]:
    figure = Figure(figsize=(7.5, 4.5), dpi=100, layout="constrained")
    return figure, figure.add_subplot()


def _save(figure: Figure, path: Path) -> Path:
    figure.savefig(path, format="png")
    return path


def _against_calls(
    timeline: Sequence[Mapping[str, Any]], key: str, scale: float
) -> tuple[list[float], list[float], list[str]]:
    xs, ys, phases = [], [], []
    for sample in timeline:
        value = sample.get(key)
        if value is None:
            continue
        xs.append(float(sample["calls"]))
        ys.append(float(value) * scale)
        phases.append(str(sample.get("phase", "ramp up")))
    return xs, ys, phases


_PHASES = (
    ("ramp up", "tab:gray", "idle, ramp up"),
    ("hold", "tab:blue", "hold"),
    ("ramp down", "tab:olive", "ramp down (not fitted)"),
)


def _scatter_with_fit(
    axes: Axes, xs: list[float], ys: list[float], phases: list[str], unit: str
) -> None:
    x = np.asarray(xs)
    y = np.asarray(ys)
    p = np.asarray(phases)
    for phase, color, label in _PHASES:
        if (p == phase).any():
            axes.scatter(x[p == phase], y[p == phase], s=14, color=color, label=label)
    fit = p != "ramp down"
    if len(set(x[fit].tolist())) >= 2:
        a, b = np.polyfit(x[fit], y[fit], 1)
        line = np.linspace(0, x.max(), 2)
        axes.plot(line, a * line + b, color="tab:red", lw=1, label=f"fit: {a:.3g} {unit} per call")
    axes.set_xlabel("concurrent calls")
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left")


def plot_cpu(results: Mapping[str, Any], out: Path) -> Path:
    figure, axes = _figure()
    xs, ys, phases = _against_calls(results["timeline"], "worker_cpu_percent", 1.0)
    _scatter_with_fit(axes, xs, ys, phases, "%")
    axes.set_ylabel("worker CPU, % of one core")
    axes.set_title("Worker CPU (front and media processes) against concurrent calls")
    return _save(figure, out / PLOTS["cpu"])


def plot_memory(results: Mapping[str, Any], out: Path) -> Path:
    figure, axes = _figure()
    xs, ys, phases = _against_calls(results["timeline"], "worker_pss_kb", 1 / 1024)
    _scatter_with_fit(axes, xs, ys, phases, "MiB")
    axes.set_ylabel("worker memory, PSS MiB")
    axes.set_title("Worker memory (PSS, every process) against concurrent calls")
    return _save(figure, out / PLOTS["memory"])


def plot_latency(results: Mapping[str, Any], out: Path) -> Path:
    figure, axes = _figure()
    samples = results["latency_samples"]
    for key, label, color in _SERIES:
        points = [(s["calls"], s[key]) for s in samples if s[key] is not None and s["calls"]]
        if points:
            x, y = zip(*points, strict=True)
            axes.scatter(x, y, s=10, alpha=0.6, color=color, label=label)
    if not samples:
        axes.text(0.5, 0.5, "no marker was heard", ha="center", transform=axes.transAxes)
    axes.set_xlabel("concurrent calls")
    axes.set_ylabel("latency, ms")
    axes.set_title("Probe latency against concurrent calls (each dot: one marker)")
    axes.grid(alpha=0.3)
    if samples:
        axes.legend(loc="upper left")
    return _save(figure, out / PLOTS["latency"])


def plot_histogram(results: Mapping[str, Any], out: Path) -> Path:
    figure, axes = _figure()
    samples = results["latency_samples"]
    held = [s for s in samples if s["hold"]] or samples
    values = [s[key] for s in held for key, _, _ in _SERIES if s[key] is not None]
    if values:
        bins = [float(b) for b in np.linspace(0, max(values) * 1.05 + 1, 60)]
        for key, label, color in _SERIES:
            series = [s[key] for s in held if s[key] is not None]
            if series:
                p50, p99 = np.percentile(series, [50, 99])
                axes.hist(
                    series,
                    bins=bins,
                    alpha=0.55,
                    color=color,
                    label=f"{label}: p50 {p50:.1f} ms, p99 {p99:.1f} ms",
                )
        axes.legend(loc="upper right")
    else:
        axes.text(0.5, 0.5, "no marker was heard", ha="center", transform=axes.transAxes)
    window = "hold window" if any(s["hold"] for s in samples) else "whole run"
    axes.set_xlabel("latency, ms")
    axes.set_ylabel("markers")
    axes.set_title(f"Latency histogram ({window}, {len(held)} markers)")
    axes.grid(alpha=0.3)
    return _save(figure, out / PLOTS["histogram"])


def plot_timeline(results: Mapping[str, Any], out: Path) -> Path:
    figure, axes = _figure()
    timeline = results["timeline"]
    t = [s["t"] for s in timeline]
    axes.plot(t, [s["calls"] for s in timeline], color="tab:green", label="concurrent calls")
    axes.set_xlabel("seconds")
    axes.set_ylabel("concurrent calls")
    axes.grid(alpha=0.3)
    cpu = [(s["t"], s["worker_cpu_percent"]) for s in timeline if s.get("worker_cpu_percent")]
    if cpu:
        right = axes.twinx()
        x, y = zip(*cpu, strict=True)
        right.plot(x, y, color="tab:blue", label="worker CPU %")
        right.set_ylabel("worker CPU, % of one core")
        right.legend(loc="upper right")
    axes.legend(loc="upper left")
    axes.set_title("The run: calls and worker CPU over time")
    return _save(figure, out / PLOTS["timeline"])


def write_plots(results: Mapping[str, Any], out: Path) -> list[Path]:
    paths = []
    if results["resources"].get("measured"):
        paths += [plot_cpu(results, out), plot_memory(results, out)]
    paths += [plot_latency(results, out), plot_histogram(results, out), plot_timeline(results, out)]
    return paths


# -- markdown -------------------------------------------------------------------------------------


def _ms(figures: Mapping[str, Any]) -> str:
    if not figures or not figures.get("count"):
        return "n/a"
    return f"{figures['p50']} / {figures['p99']} ms ({figures['count']} samples)"


def _loss(figures: Mapping[str, Any] | None) -> str:
    if not figures or figures.get("percent") is None:
        return "n/a"
    return (
        f"{figures['percent']:.3f} % ({figures['lost']} of {figures['packets']} packets,"
        f" {figures['calls']} calls)"
    )


def headline(results: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The report's table: (figure, value) rows, also printed at the end of a run."""
    calls = results["calls"]
    res = results["resources"]
    latency = results["latency_ms"]
    loss = results["loss"]
    dtmf = results["dtmf"]
    rows = [
        (
            "calls: planned / successful / failed",
            f"{calls['planned']} / {calls['successful']} / {calls['failed']}",
        ),
        ("peak concurrent calls", str(calls["peak_concurrent"])),
        ("setup time INVITE → 200 p50 / p99", _ms(results["setup_ms"])),
    ]
    if res.get("measured"):
        rows += [
            (
                "worker CPU, idle / at the hold",
                f"{res['cpu_idle_percent']} % / {res['cpu_hold_percent']} % of one core",
            ),
            (
                "CPU per call (hold mean / fitted slope)",
                f"{res['cpu_per_call_percent']} % / {res['cpu_slope_percent_per_call']} %"
                " of one core",
            ),
            (
                "memory (PSS), idle / at the hold",
                f"{_mib(res['pss_idle_kb'])} / {_mib(res['pss_hold_kb'])}",
            ),
            (
                "memory per call (hold / fitted slope)",
                f"{res['pss_per_call_kb']} KB / {res['pss_slope_kb_per_call']} KB",
            ),
        ]
    else:
        rows.append(("worker CPU and memory", "not measured (no worker process to read)"))
    rows += [
        (
            f"latency caller → agent p50 / p99 ({latency['window']})",
            _ms(latency["caller_to_agent"]),
        ),
        (
            f"latency agent → caller p50 / p99 ({latency['window']})",
            _ms(latency["agent_to_caller"]),
        ),
        (f"round trip p50 / p99 ({latency['window']})", _ms(latency["round_trip"])),
        ("pacing jitter towards the caller p50 / p99", _ms(results["pacing_jitter_ms"])),
        (
            "loss caller → worker (worker's counters: lost, late or discarded, every call)",
            _loss(loss.get("caller_to_worker")),
        ),
        (
            "loss worker → caller (worker's counters: 20 ms packets not sent, every call)",
            _loss(loss.get("worker_to_caller")),
        ),
        ("loss caller → worker (probes, RTCP reports)", _loss(loss.get("caller_to_worker_probes"))),
        (
            "loss worker → caller (probes, sequence numbers)",
            _loss(loss.get("worker_to_caller_probes")),
        ),
        (
            "DTMF digits sent / at the worker / at the agent",
            f"{dtmf['sent']} / {_or_na(dtmf['received_by_worker'])} / "
            f"{_or_na(dtmf['received_by_agent'])}",
        ),
    ]
    harness = results.get("harness_cpu_percent")
    if harness:
        rows.append(
            (
                "harness CPU at the hold (agent / SIPp / probes)",
                " / ".join(f"{_or_na(harness.get(k))} %" for k in ("agent", "sipp", "probe")),
            )
        )
    return rows


def _mib(kb: int | None) -> str:
    return "n/a" if kb is None else f"{kb / 1024:.1f} MiB"


def _or_na(value: object) -> str:
    return "n/a" if value is None else str(value)


def write_markdown(results: Mapping[str, Any], plots: Sequence[Path], out: Path) -> Path:
    run = results["run"]
    lines = [
        f"# Load test: {run['target']}",
        "",
        f"{run['started_at']}, {run['machine']['cpus']} CPUs, Python {run['machine']['python']}."
        f" Command: `{run['command']}`.",
        "",
        f"Worker: {run['worker']}. Agent protocol: {run['protocol']}. "
        f"{run['calls']} calls ({run['probes']} of them probe phones) at {run['rate']} calls/s,"
        f" each bulk call {run['call_seconds']} s, every call up for about {run['hold']} s.",
        "",
        "| figure | value |",
        "| --- | --- |",
        *(f"| {name} | {value} |" for name, value in headline(results)),
        "",
    ]
    notes = results.get("notes") or []
    if notes:
        lines += ["Notes:", "", *(f"- {note}" for note in notes), ""]
    lines += [f"![{path.stem}]({path.name})" for path in plots]
    lines.append("")
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
