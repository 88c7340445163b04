"""scripts/cpu_breakdown.py: perf's reports read into shares, the shares into µs per call that
add up to the measured total, and a real run of it, with perf, on a process whose work is known
(LAME encoding and numpy in a loop)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "cpu_breakdown.py"

DSO_REPORT = """\
# Samples: 7K of event 'cpu-clock'
#
# Overhead  Shared Object
# ........  .................................................
#
    45.00%  libpython3.11.so.1.0
    20.00%  [kernel.kallsyms]
    12.00%  lameenc.cpython-311-x86_64-linux-gnu.so
    10.00%  _multiarray_umath.cpython-311-x86_64-linux-gnu.so
     5.00%  libc.so.6
     3.00%  loop.cpython-311-x86_64-linux-gnu.so
     2.00%  libscipy_openblas64_-32a4b2a6.so
     2.00%  [vdso]
     1.00%  _struct.cpython-311-x86_64-linux-gnu.so
"""

SYMBOL_REPORT = """\
# Children      Self  Symbol
# ........  ........  ......
#
    21.00%     0.30%  [k] do_syscall_64
     6.00%     0.10%  [k] do_epoll_wait
     5.00%     0.20%  [k] udp_sendmsg
     4.00%     0.10%  [k] tcp_sendmsg
     4.50%     0.20%  [k] vfs_write
     4.00%     0.00%  [k] sock_write_iter
     1.00%     0.10%  [k] udp_recvmsg
    21.59%    21.59%  [.] _PyEval_EvalFrameDefault
"""


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cpu_breakdown", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reports_are_read_into_shares() -> None:
    script = _script()
    dsos = script.dso_shares(DSO_REPORT)
    assert dsos["libpython3.11.so.1.0"] == 45.0
    assert dsos["[vdso]"] == 2.0
    assert abs(sum(dsos.values()) - 100.0) < 1e-9
    symbols = script.symbol_shares(SYMBOL_REPORT)
    assert symbols == {
        "do_syscall_64": 21.0,
        "do_epoll_wait": 6.0,
        "udp_sendmsg": 5.0,
        "tcp_sendmsg": 4.0,
        "vfs_write": 4.5,
        "sock_write_iter": 4.0,
        "udp_recvmsg": 1.0,
    }


def test_parts_add_up_to_the_measured_cost() -> None:
    script = _script()
    rows = dict(
        (name.strip(), (percent, us))
        for name, percent, us in script.breakdown(
            script.dso_shares(DSO_REPORT), script.symbol_shares(SYMBOL_REPORT), 200.0
        )
    )
    assert rows["kernel"] == (22.0, 44.0)  # kallsyms and vdso
    assert rows["MP3 encoder (LAME)"] == (12.0, 24.0)
    assert rows["numpy"] == (12.0, 24.0)  # numpy's own and the BLAS it calls
    assert rows["Python interpreter"] == (45.0, 90.0)
    assert rows["other"] == (1.0, 2.0)  # _struct
    top = [r for r in script.breakdown(script.dso_shares(DSO_REPORT), {}, 200.0)]
    assert abs(sum(us for name, _, us in top if not name.startswith("  ")) - 200.0) < 1e-9
    kernel_parts = [name for name in rows if name in {p for p, _ in script.KERNEL_PARTS}]
    assert (
        abs(sum(rows[p][1] for p in kernel_parts) + rows["the kernel's other work"][1] - 44.0)
        < 1e-9
    )
    assert rows["waiting, woken (do_epoll_wait)"] == (6.0, 12.0)
    assert rows["RTP sent (udp_sendmsg)"] == (5.0, 10.0)
    # file writes: through vfs_write but not into a socket
    assert abs(rows["file writes (vfs_write, not to a socket)"][0] - 0.5) < 1e-9


def test_a_real_process_under_perf(tmp_path: Path) -> None:
    """A process that spends its time in LAME and numpy is seen doing so."""
    busy = subprocess.Popen(
        [sys.executable, "-c",
         "import time, lameenc, numpy as np\n"
         "from media.recorder import stereo_encoder\n"
         "e = stereo_encoder(8000); pcm = (np.arange(3200) % 200 * 50).astype('<i2').tobytes()\n"
         "x = np.random.default_rng(1).standard_normal(4000)\n"
         "end = time.monotonic() + 20\n"
         "while time.monotonic() < end:\n"
         "    e.encode(pcm); np.correlate(x, x[:64], 'valid')\n"],
        cwd=REPO,
    )  # fmt: skip
    try:
        out = tmp_path / "breakdown.json"
        done = subprocess.run(
            [sys.executable, str(SCRIPT), "--pid", str(busy.pid), "--calls", "1", "--seconds",
             "1", "--json", str(out)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
    finally:
        busy.kill()
        busy.wait()
    figures = json.loads(out.read_text())
    parts = {p["part"]: p for p in figures["parts"]}
    assert figures["worker_cpu_percent"] > 50  # one busy process
    assert parts["MP3 encoder (LAME)"]["percent"] > 20
    assert parts["numpy"]["percent"] > 2
    total = sum(p["us"] for p in figures["parts"] if p["part"] in {g for g, _ in _script().GROUPS})
    assert abs(total + parts["other"]["us"] - figures["us_per_call_per_20ms"]) < 0.1
    assert "the kernel and LAME together" in done.stdout


def test_a_missing_process_is_refused() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--pid", "999999999", "--calls", "1", "--seconds", "1"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "no such process" in done.stderr
