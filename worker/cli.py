"""The ``aispinner-worker`` command line: run the worker, check and show its settings, render the
Asterisk configuration the ARI ingress needs, push or delete the trunks it keeps in Asterisk."""

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
    return parser


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


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = _load(args.config)
    if args.command == "config":
        print(json.dumps(settings.model_dump(mode="json"), indent=2))
        return 0
    if args.command == "asterisk-config":
        return _asterisk_config(settings, args.out)
    if args.command == "ari-trunks":
        return _ari_trunks(settings, args.action, args.names)
    if args.command == "run":
        from worker.app import run_forever

        return run_forever(settings)
    raise AssertionError(args.command)  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
