"""The ``aispinner-worker`` command line: run the worker, check and show its settings, render the
Asterisk configuration the ARI ingress needs, push or delete the trunks it keeps in Asterisk,
issue an API token, place a call through a running worker's API, and load-test a worker (or any
SIP address) from outside."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from worker import __version__
from worker.config import Settings, load_settings
from worker.errors import ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aispinner-worker",
        description="Telephony media worker: SIP trunks and Asterisk calls bridged to agents.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        default=None,
        help="TOML settings file (default: $AISPINNER_CONFIG, else built-in defaults)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("run", help="run the worker until interrupted (SIGINT/SIGTERM)")
    sub.add_parser("config", help="validate the settings and print them as JSON")
    render = sub.add_parser(
        "asterisk-config",
        help="write the Asterisk configuration for the ARI ingress, rendered from the settings",
    )
    render.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="folder to write the files into"
    )
    trunks = sub.add_parser(
        "ari-trunks",
        help="push the [ari.trunks] into Asterisk now, or delete them from it",
    )
    trunks.add_argument("action", choices=("push", "delete"))
    trunks.add_argument(
        "names", nargs="*", metavar="NAME", help="trunks to act on (default: every one)"
    )
    _add_api_commands(sub)
    _add_loadtest_command(sub)
    return parser


def _add_loadtest_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    load = sub.add_parser(
        "loadtest",
        help="load a worker with SIPp callers and probe phones bridged to an echo agent; "
        "measure CPU and memory per call, latency, jitter, loss, setup time, failures",
        description="Start an echo agent, the worker (unless --target), probe phones and SIPp; "
        "ramp to --calls concurrent calls at --rate per second, hold them --hold seconds; "
        "write results.json, PNG plots and report.md into --out.",
    )
    load.add_argument("--calls", type=int, default=100, help="concurrent calls (default 100)")
    load.add_argument("--rate", type=float, default=10.0, help="new calls per second (default 10)")
    load.add_argument(
        "--hold", type=float, default=30.0, help="seconds with every call up (default 30)"
    )
    load.add_argument(
        "--processes",
        type=int,
        default=0,
        help="the worker's media processes (default 0: one per core)",
    )
    load.add_argument(
        "--target",
        metavar="HOST:PORT",
        help="load this SIP address instead of starting a worker (Asterisk, another worker); "
        "its route for the dialled numbers (loadtest*) must reach the echo agent",
    )
    load.add_argument(
        "--worker-pid",
        type=int,
        metavar="PID",
        help="with --target: measure this process and its descendants' CPU and memory",
    )
    load.add_argument(
        "--out",
        type=Path,
        default=Path("loadtest-results"),
        metavar="DIR",
        help="where results.json, the plots and report.md go (default loadtest-results)",
    )
    load.add_argument("--no-record", action="store_true", help="the worker records no call")
    load.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="a setting of the worker it starts (repeat), e.g. rtp.jitter_min_ms=20",
    )
    load.add_argument(
        "--protocol",
        choices=("jambonz", "twilio"),
        default="jambonz",
        help="how the worker talks to the echo agent (default jambonz: listen, 16 kHz)",
    )
    load.add_argument(
        "--probes", type=int, default=4, help="probe phones among the calls (default 4)"
    )
    load.add_argument(
        "--agent-port",
        type=int,
        default=0,
        help="the echo agent's port (default: any free one; fix it for --target)",
    )
    load.add_argument(
        "--agent-host", default="127.0.0.1", help="the echo agent's address (default 127.0.0.1)"
    )
    load.add_argument(
        "--keep", action="store_true", help="keep the worker's data folder (recordings, events)"
    )
    load.add_argument("--quiet", action="store_true", help="no progress lines")


def _add_api_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    token = sub.add_parser("token", help="print an API token (JWT) signed with the worker's key")
    token.add_argument("--uid", required=True, help="the user the token names")
    token.add_argument(
        "--workspace",
        type=int,
        action="append",
        default=[],
        metavar="N",
        help="a workspace the user is a member of (repeat for several)",
    )
    token.add_argument("--operator", action="store_true", help="may see every workspace")
    token.add_argument("--hours", type=float, default=1.0, help="lifetime (default: 1)")
    call = sub.add_parser("call", help="place an outbound call through a running worker's API")
    call.add_argument("number", help="the number to call (E.164 or digits)")
    call.add_argument("--trunk", required=True, help="the trunk to call through")
    call.add_argument("--route", default=None, help="the route (its match) whose agent talks")
    call.add_argument("--caller-id", default=None, help="the From user")
    call.add_argument(
        "--api", default=None, metavar="URL", help="the worker's API (default: from [api])"
    )


def _load(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except ConfigError as exc:
        print(f"aispinner-worker: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc


def _asterisk_config(settings: Settings, out: Path) -> int:
    from worker.asterisk_config import write

    try:
        paths = write(settings, out)
    except ConfigError as exc:
        print(f"aispinner-worker: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    except OSError as exc:
        print(f"aispinner-worker: cannot write into {out}: {exc}", file=sys.stderr)
        return 1
    for path in paths:
        print(f"wrote {path}")
    if "ari" in settings.ingress:
        run = f"run the worker with these settings (ingress = {json.dumps(settings.ingress)})"
    else:
        run = 'set ingress = ["ari"] (or ["sip", "ari"]) in these settings and run the worker'
    print(
        "\nnext steps:\n"
        "  1. copy these files into /etc/asterisk (back up the ones they replace)\n"
        "  2. restart Asterisk, which reads sorcery.conf only at start"
        " (systemctl restart asterisk)\n"
        f"  3. {run}"
    )
    return 0


def _ari_trunks(settings: Settings, action: str, names: Sequence[str]) -> int:
    import asyncio

    from worker.ari.client import AriClient, AriError
    from worker.ari.trunks import delete_trunk, push_trunk

    trunks = settings.ari.trunks
    unknown = sorted(set(names) - trunks.keys())
    if unknown:
        print(f"aispinner-worker: no [ari.trunks] named {', '.join(unknown)}", file=sys.stderr)
        return 2
    chosen = list(names) or sorted(trunks)
    if not chosen:
        print("aispinner-worker: no [ari.trunks] in the settings", file=sys.stderr)
        return 2

    async def act() -> int:
        ari = settings.ari
        client = AriClient(ari.url, ari.username, ari.password, timeout=ari.request_timeout_s)
        failed = 0
        try:
            for name in chosen:
                try:
                    if action == "push":
                        await push_trunk(client, name, trunks[name])
                    else:
                        await delete_trunk(client, name, trunks[name])
                except AriError as exc:
                    failed += 1
                    print(f"{name}: {exc}", file=sys.stderr)
                else:
                    print(f"{name}: {'pushed' if action == 'push' else 'deleted'}")
        finally:
            await client.aclose()
        return 1 if failed else 0

    return asyncio.run(act())


MAX_TOKEN_HOURS = 24 * 366


def _issue(
    settings: Settings, uid: str, workspaces: list[int], operator: bool, hours: float
) -> str:
    from worker.api.auth import AuthError, TokenVerifier

    try:
        verifier = TokenVerifier(settings.api, settings.data_dir)
        return verifier.issue(uid, workspaces, operator=operator, lifetime_s=hours * 3600)
    except AuthError as exc:
        print(
            f"aispinner-worker: cannot issue tokens: {exc} (api.jwt_public_key is set;"
            " sign them where the private key is)",
            file=sys.stderr,
        )
        raise SystemExit(2) from exc
    except OSError as exc:
        print(f"aispinner-worker: cannot read the API key: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc


def _token(settings: Settings, args: argparse.Namespace) -> int:
    if not args.workspace and not args.operator:
        print("aispinner-worker: give --workspace N (or --operator)", file=sys.stderr)
        return 2
    if not 0 < args.hours <= MAX_TOKEN_HOURS:
        print(f"aispinner-worker: --hours must be in (0, {MAX_TOKEN_HOURS}]", file=sys.stderr)
        return 2
    print(_issue(settings, args.uid, args.workspace, args.operator, args.hours))
    return 0


def _api_url(settings: Settings) -> str:
    host = settings.api.host
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.api.port}"


def _call(settings: Settings, args: argparse.Namespace) -> int:
    import httpx

    base = (args.api or _api_url(settings)).rstrip("/")
    token = _issue(settings, "aispinner-worker-cli", [1], True, 0.1)
    body = {
        "number": args.number,
        "trunk": args.trunk,
        "route": args.route,
        "caller_id": args.caller_id,
    }
    try:
        response = httpx.post(
            f"{base}/telephony/calls",
            json=body,
            headers={"Authorization": f"Bearer {token}"},
            timeout=30.0,
        )
    except httpx.HTTPError as exc:
        print(f"aispinner-worker: cannot reach the API at {base}: {exc}", file=sys.stderr)
        return 1
    try:
        answer = response.json()
    except ValueError:
        answer = {}
    if response.status_code != 201 or not isinstance(answer, dict):
        detail = answer.get("detail") if isinstance(answer, dict) else None
        print(
            f"aispinner-worker: {response.status_code}: {detail or response.text[:200]}",
            file=sys.stderr,
        )
        return 1
    print(answer["call_id"])
    return 0


def _setting(item: str) -> tuple[str, str]:
    key, equals, value = item.partition("=")
    if not equals:
        raise SystemExit(f"aispinner-worker loadtest: --set {item!r}: give SECTION.KEY=VALUE")
    return key.strip(), value.strip()


def _loadtest(args: argparse.Namespace) -> int:
    import asyncio

    from worker.loadtest.run import Options, run_loadtest

    options = Options(
        calls=args.calls,
        rate=args.rate,
        hold=args.hold,
        processes=args.processes,
        target=args.target,
        out=args.out,
        record=not args.no_record,
        protocol=args.protocol,
        probes=args.probes,
        agent_host=args.agent_host,
        agent_port=args.agent_port,
        worker_pid=args.worker_pid,
        keep=args.keep,
        quiet=args.quiet,
        settings=tuple(_setting(item) for item in args.set),
    )
    try:
        return run_loadtest(options)
    except ConfigError as exc:
        print(f"aispinner-worker loadtest: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, asyncio.CancelledError):  # Ctrl-C, or SIGTERM
        print(
            "aispinner-worker loadtest: interrupted; everything it started is stopped",
            file=sys.stderr,
        )
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "loadtest":  # starts its own worker: the settings are not read
        return _loadtest(args)
    settings = _load(args.config)
    if args.command == "config":
        print(json.dumps(settings.model_dump(mode="json"), indent=2))
        return 0
    if args.command == "asterisk-config":
        return _asterisk_config(settings, args.out)
    if args.command == "ari-trunks":
        return _ari_trunks(settings, args.action, args.names)
    if args.command == "token":
        return _token(settings, args)
    if args.command == "call":
        return _call(settings, args)
    if args.command == "run":
        from worker.app import run_forever
        from worker.front.front import process_count
        from worker.front.front import serve as serve_front

        several = process_count(settings) > 1
        return run_forever(settings, serve_front if several else None)
    raise AssertionError(args.command)  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
