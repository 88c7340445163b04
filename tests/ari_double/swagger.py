"""Asterisk's ARI Swagger 1.1 files (``tests/data/ari/api-docs``): routing a request path to its
operations the way ``res_ari.c`` walks its handler tree (``404 Resource not found``, ``405 Invalid
method``), and the double's own parameter checks.

Asterisk's generated glue checks no parameter: a missing required parameter or an unlisted value
reaches the resource code (``atoi`` turns ``timeout=abc`` into 0). The double is stricter on
purpose: unknown parameters, values of the wrong type, values outside ``allowableValues`` and
missing required parameters get a 400, except the parameters the resource code itself checks
with a recorded message (those are listed by the handler and left to it).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from tests.ari_double.recordings import API_DOCS_DIR

JsonObject = dict[str, Any]

_INTEGER = re.compile(r"[+-]?\d+\Z")
_TRUE = frozenset({"yes", "true", "y", "t", "1", "on"})
_FALSE = frozenset({"no", "false", "n", "f", "0", "off"})


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    param_type: str
    """``path``, ``query`` or ``body``."""
    required: bool
    data_type: str
    allow_multiple: bool
    allowed: tuple[str, ...] | None
    """``allowableValues`` of type LIST."""
    minimum: int | None
    maximum: int | None


@dataclass(frozen=True, slots=True)
class Operation:
    resource: str
    """The api-docs file the operation comes from: ``channels``, ``bridges`` ..."""
    path: str
    method: str
    nickname: str
    params: tuple[Param, ...]
    upgrade: str | None

    def param(self, name: str) -> Param | None:
        for param in self.params:
            if param.name == name:
                return param
        return None

    @property
    def body_param(self) -> Param | None:
        return next((p for p in self.params if p.param_type == "body"), None)


@dataclass(slots=True)
class _Node:
    segment: str
    wildcard: bool
    children: list[_Node] = field(default_factory=list)
    operations: dict[str, Operation] = field(default_factory=dict)

    def child(self, segment: str) -> _Node:
        wildcard = segment.startswith("{") and segment.endswith("}")
        name = segment[1:-1] if wildcard else segment
        for child in self.children:
            if child.segment == name and child.wildcard == wildcard:
                return child
        node = _Node(name, wildcard)
        self.children.append(node)
        # Literal segments are tried before a path variable, as in the generated handler tree
        # (POST /channels/externalMedia is not originateWithId with channelId "externalMedia").
        self.children.sort(key=lambda n: n.wildcard)
        return node


@dataclass(frozen=True, slots=True)
class Route:
    """Where a path led: the operations of that node by HTTP method, and its path variables."""

    operations: Mapping[str, Operation]
    path_vars: Mapping[str, str]

    def allow_header(self) -> str:
        return ",".join(["OPTIONS", *self.operations])


def _param(raw: JsonObject) -> Param:
    allowable = raw.get("allowableValues") or {}
    allowed = None
    minimum = maximum = None
    if allowable.get("valueType") == "LIST":
        allowed = tuple(str(v) for v in allowable["values"])
    elif allowable.get("valueType") == "RANGE":
        minimum = allowable.get("min")
        maximum = allowable.get("max")
    return Param(
        name=raw["name"],
        param_type=raw["paramType"],
        required=bool(raw.get("required")),
        data_type=raw["dataType"],
        allow_multiple=bool(raw.get("allowMultiple")),
        allowed=allowed,
        minimum=minimum,
        maximum=maximum,
    )


class SwaggerApi:
    """All resources listed in ``resources.json``, as a routing tree."""

    def __init__(self, directory: Path = API_DOCS_DIR) -> None:
        self.directory = directory
        self._root = _Node("", False)
        self._operations: dict[tuple[str, str], Operation] = {}
        listing = json.loads((directory / "resources.json").read_text(encoding="utf-8"))
        for api in listing["apis"]:
            resource = api["path"].split("/")[-1].split(".")[0]
            doc = json.loads((directory / f"{resource}.json").read_text(encoding="utf-8"))
            for entry in doc["apis"]:
                node = self._root
                for segment in entry["path"].strip("/").split("/"):
                    node = node.child(segment)
                for raw in entry["operations"]:
                    operation = Operation(
                        resource=resource,
                        path=entry["path"],
                        method=raw["httpMethod"],
                        nickname=raw["nickname"],
                        params=tuple(_param(p) for p in raw.get("parameters", ())),
                        upgrade=raw.get("upgrade"),
                    )
                    node.operations[operation.method] = operation
                    self._operations[(resource, operation.nickname)] = operation

    def operation(self, resource: str, nickname: str) -> Operation:
        return self._operations[(resource, nickname)]

    def operations(self) -> list[Operation]:
        return list(self._operations.values())

    def route(self, raw_path: str) -> Route | None:
        """Walk the tree with the (still percent-encoded) path after ``/ari``; None if a segment
        matches nothing (``Resource not found``). Like ``ast_ari_invoke`` the walk stops at the
        first empty segment."""
        node = self._root
        path_vars: dict[str, str] = {}
        for raw_segment in raw_path.lstrip("/").split("/"):
            if not raw_segment:
                break
            segment = unquote(raw_segment)
            found = None
            for child in node.children:
                if child.wildcard:
                    path_vars[child.segment] = segment
                    found = child
                    break
                if child.segment == segment:
                    found = child
                    break
            if found is None:
                return None
            node = found
        return Route(node.operations, path_vars)


@functools.cache
def api() -> SwaggerApi:
    return SwaggerApi()


def check_params(
    operation: Operation, values: Mapping[str, str], checked_by_resource: Collection[str] = ()
) -> str | None:
    """The double's check of the query parameters of one request; a message, or None if fine.

    ``checked_by_resource`` names parameters whose absence or value the resource code answers
    with its own recorded error, so they are not checked here.
    """
    for name in values:
        param = operation.param(name)
        if param is None or param.param_type != "query":
            return _stricter(f"Unknown parameter '{name}' for {operation.method} {operation.path}")
    for param in operation.params:
        if param.param_type != "query" or param.name in checked_by_resource:
            continue
        value = values.get(param.name)
        if value is None:
            if param.required:
                return _stricter(f"Missing required parameter '{param.name}'")
            continue
        items = [v for v in value.split(",") if v] if param.allow_multiple else [value]
        for item in items:
            problem = _check_value(param, item)
            if problem:
                return _stricter(problem)
    return None


def _check_value(param: Param, value: str) -> str | None:
    if param.data_type in ("int", "long"):
        if not _INTEGER.match(value):
            return f"Parameter '{param.name}' must be an integer, not '{value}'"
        number = int(value)
        if param.minimum is not None and number < param.minimum:
            return f"Parameter '{param.name}' must be at least {param.minimum}"
        if param.maximum is not None and number > param.maximum:
            return f"Parameter '{param.name}' must be at most {param.maximum}"
    elif param.data_type == "boolean" and value.lower() not in _TRUE | _FALSE:
        return f"Parameter '{param.name}' must be a boolean, not '{value}'"
    if param.allowed is not None and value not in param.allowed:
        listed = ", ".join(param.allowed)
        return f"Parameter '{param.name}' must be one of {listed}, not '{value}'"
    return None


def _stricter(message: str) -> str:
    return f"{message} (checked by the ARI test double, stricter than Asterisk)"


def is_true(value: str | None) -> bool:
    """Asterisk's ``ast_true``."""
    return value is not None and value.lower() in _TRUE
