"""The C heap of a process that carries calls: glibc malloc told to give large blocks their
own mappings.

Every recorded call owns a LAME encoder (lameenc), whose state is a few large ``calloc``
blocks. glibc serves a large block from the heap once its adaptive mmap threshold has risen
(it rises each time a mapped block is freed, up to 32 MB), and ``calloc`` then clears reused
heap memory byte by byte: every page of the block becomes resident, used or not. Measured
here: an encoder holds ~310 KB resident in a process that has churned (calls come and go),
~115-150 KB when blocks of 64 KiB and more are always mapped (fresh zero pages, cleared by the
kernel, resident only where LAME writes; given back to the system when the call ends). That
is most of a call's memory. The cost: one ``mmap``/``munmap`` per such block, a few per call
set-up, none on the 20 ms path (its buffers are far smaller).

``tune()`` runs once when a process that carries calls starts. It does nothing off glibc, or
when the operator set ``MALLOC_MMAP_THRESHOLD_`` (glibc's own variable) themselves.
"""

from __future__ import annotations

import ctypes
import os

MMAP_THRESHOLD = 64 * 1024
"""Blocks of this size and more get their own mapping (glibc's default starts at 128 KiB and
adapts upwards)."""

_M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def tune() -> bool:
    """Fix glibc's mmap threshold at ``MMAP_THRESHOLD``; False when it was not changed."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
