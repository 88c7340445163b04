"""The recorded Asterisk 22.10.1 ARI traffic (``tests/data/ari``) as Python data: the lines of
each scenario, and the pieces the double copies from them rather than guessing (event key orders,
``/asterisk/info``, the PJSIP objects' attribute lists, the RTP quality variables)."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "ari"
RECORDINGS_DIR = DATA_DIR / "recordings"
API_DOCS_DIR = DATA_DIR / "api-docs"

JsonObject = dict[str, Any]


def names() -> list[str]:
    """The scenario names (file stems), sorted."""
    return sorted(path.stem for path in RECORDINGS_DIR.glob("*.jsonl"))


@functools.cache
def _load(name: str) -> tuple[JsonObject, ...]:
    path = RECORDINGS_DIR / f"{name}.jsonl"
    with path.open(encoding="utf-8") as lines:
        return tuple(json.loads(line) for line in lines if line.strip())


def load(name: str) -> list[JsonObject]:
    """Every line of one recording, in file order (a fresh list of shared, read-only dicts)."""
    return list(_load(name))


def rest_lines(name: str) -> list[JsonObject]:
    return [line for line in _load(name) if line["dir"] == "rest"]


def events(name: str) -> list[JsonObject]:
    """The ``event`` lines of one recording in arrival order (each has ``ws`` and ``event``)."""
    return [line for line in _load(name) if line["dir"] == "event"]


def _rest_response(name: str, method: str, path: str) -> Any:
    for line in _load(name):
        if line["dir"] == "rest" and line["method"] == method and line["path"] == path:
            return line["response"]
    raise LookupError(f"{name}: no {method} {path}")


@functools.cache
def event_key_orders() -> dict[str, tuple[tuple[str, ...], ...]]:
    """For each event type, every key order seen in the recordings (one per distinct key set)."""
    orders: dict[str, list[tuple[str, ...]]] = {}
    for name in names():
        for line in events(name):
            event = line["event"]
            keys = tuple(event)
            seen = orders.setdefault(event["type"], [])
            if keys not in seen:
                seen.append(keys)
    return {event_type: tuple(keys) for event_type, keys in orders.items()}


@functools.cache
def asterisk_id() -> str:
    ids = {line["event"]["asterisk_id"] for name in names() for line in events(name)}
    (only,) = ids
    return str(only)


def asterisk_info() -> JsonObject:
    """``GET /asterisk/info`` as recorded on the idle system (a fresh copy)."""
    info: JsonObject = json.loads(
        json.dumps(_rest_response("ari_basics", "GET", "/ari/asterisk/info"))
    )
    return info


def _attribute_list(name: str, method: str, path: str) -> tuple[tuple[str, str], ...]:
    response = _rest_response(name, method, path)
    return tuple((item["attribute"], item["value"]) for item in response)


@functools.cache
def pjsip_attributes() -> dict[str, tuple[tuple[str, str], ...]]:
    """The recorded attribute list (order and values) of one object of each recorded type:
    ``endpoint`` and ``identify`` as pjsip.conf's ``trunk``, ``auth`` and ``aor`` as the
    ``trunk2-auth``/``trunk2`` objects created in memory."""
    base = "/ari/asterisk/config/dynamic/res_pjsip"
    return {
        "endpoint": _attribute_list("dynamic_config", "GET", f"{base}/endpoint/trunk"),
        "identify": _attribute_list("dynamic_config", "GET", f"{base}/identify/trunk"),
        "auth": _attribute_list("dynamic_config", "GET", f"{base}/auth/trunk2-auth"),
        "aor": _attribute_list("dynamic_config", "GET", f"{base}/aor/trunk2"),
    }


@functools.cache
def rtp_quality_values() -> tuple[tuple[str, str], ...]:
    """The five RTPAUDIOQOS* variables (name, value) a PJSIP channel gets when it hangs up, in
    the recorded order (values from the first recording that has them)."""
    found: list[tuple[str, str]] = []
    for line in events("inbound_answer_bridge_externalmedia_dtmf_caller_hangup"):
        event = line["event"]
        variable = event.get("variable", "")
        if (
            event["type"] == "ChannelVarset"
            and variable.startswith("RTPAUDIOQOS")
            and not variable.endswith("BRIDGED")
        ):
            found.append((variable, event["value"]))
    return tuple(found)


def rtp_note(name: str) -> JsonObject:
    """The ``rtp`` note of a recording (what the listener behind externalMedia received)."""
    for line in _load(name):
        if line["dir"] == "note" and line.get("kind") == "rtp":
            return line
    raise LookupError(f"{name} has no rtp note")


def ws_connect(label: str) -> JsonObject:
    """The ``ws`` connect line of a websocket label in ``ari_errors`` (the refused handshakes)."""
    for line in _load("ari_errors"):
        if line["dir"] == "ws" and line["ws"] == label and line["action"] == "connect":
            return line
    raise LookupError(f"ari_errors has no websocket {label}")
