#!/usr/bin/env bash
# Installs everything the project needs on a Debian 12 machine, idempotently:
# the apt packages (SIPp, ffmpeg, espeak-ng, sox, systemd; perf and valgrind for two benchmark
# scripts) and the Python virtual environment in .venv.
# Called by every Makefile target; safe to run again (it only acts on what is missing).
set -euo pipefail
cd "$(dirname "$0")/.."

# systemd: its systemd-analyze checks config/aispinner-worker.service (on a Debian host it is
# there already). linux-perf: scripts/cpu_breakdown.py; valgrind: scripts/bench_tick.py
# --instructions.
APT_PACKAGES=(sip-tester ffmpeg espeak-ng sox python3-venv systemd linux-perf valgrind)
PYTHON=${PYTHON:-python3}
VENV=.venv

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "setup: installing apt packages: ${missing[*]}"
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

stamp="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    echo "setup: preparing the virtual environment in $VENV"
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q -e ".[dev]"
    rm -f "$VENV"/.installed-*
    touch "$stamp"
fi
