#!/usr/bin/env python3
"""Branch coverage per package, from the ``.coverage`` file ``make test`` leaves.

Prints coverage.py's combined figure (covered statements plus covered branches, over all of
them) for ``media/``, ``worker/sip/``, ``worker/ari/``, ``worker/agent/`` and
``worker/session/``, then the rest of ``worker/``. With ``--fail-under N`` it exits 1 when one
of the five packages is below N percent (``make test`` asks for 90 when it ran the whole
suite). ``--json PATH`` also writes the figures.

Run: ``.venv/bin/python scripts/coverage_report.py [--fail-under 90] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import coverage

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("media/", "worker/sip/", "worker/ari/", "worker/agent/", "worker/session/")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--data", default=str(ROOT / ".coverage"), help="the coverage data file")
    parser.add_argument("--fail-under", type=float, default=None, help="percent, per package")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    if not Path(args.data).exists():
        print(f"coverage: no data in {args.data}: run the tests with --cov first")
        return 1
    cov = coverage.Coverage(data_file=args.data)
    cov.load()
    figures: dict[str, float] = {}
    print("branch coverage (statements and branches) per package")
    for package in (*PACKAGES, "worker/"):
        include = [str(ROOT / package / "*")]
        omit = [str(ROOT / p / "*") for p in PACKAGES] if package == "worker/" else None
        try:
            percent = cov.report(include=include, omit=omit, file=io.StringIO())
        except coverage.exceptions.NoDataError:
            continue
        name = "worker/ (the rest)" if package == "worker/" else package
        figures[name] = round(percent, 1)
        print(f"  {name:<20} {percent:6.1f} %")
    failed = [
        p for p in PACKAGES if args.fail_under is not None and figures.get(p, 0.0) < args.fail_under
    ]
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    if failed:
        print(f"coverage: below {args.fail_under:g} %: {', '.join(failed)}")
        return 1
    if args.fail_under is not None:
        print(f"coverage: every package at or above {args.fail_under:g} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
