"""How much freed memory a long job hands back to the system (glibc's malloc on Linux), chosen with
``TAXOCLIP_MALLOC``.

A training step allocates and frees tensors whose shapes change with its batch. At iNat2021's
10,000 classes, `train lit` reads ~490–510 distinct captions a batch. glibc keeps what a step freed
in its heap for reuse, and raises the size above which blocks get their own mapping to the largest
block freed (up to 32 MiB). So the big per-step tensors live in the heap, their shapes change, and
the freed space fragments. `train lit` at 100k rows grew from ~2.1 GB at its first steps to a
3.1–3.4 GB peak after 40 (docs/measured.md). It now pads each step's captions to a few bucketed
counts (`models.losses.bucketed`), so shapes repeat: 2.7 GB by default. These modes give back more:

  default  glibc as it is: the fastest steps (the baseline below)
  trim     after every training step, give the heap's free pages back (malloc_trim): peak
           2.4 GB, steps ~10% slower
  mmap     blocks of 64 KiB and more get their own mapping, unmapped when freed, and the heap's
           free top is given back (mallopt): peak 2.1 GB, steps ~25% slower (each big tensor's
           pages are zeroed anew)

Measured at 10,000 classes × 100k rows, 40 steps. The variable is read when the command line
starts and after each step, and torchrun's processes inherit it. Elsewhere (macOS, musl,
Windows) every mode behaves as ``default``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from functools import cache

from taxoclip.errors import TaxoclipError

MODES = ("default", "trim", "mmap")
VARIABLE = "TAXOCLIP_MALLOC"
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD = 64 * 1024


def mode() -> str:
    """The chosen mode; a clear message for a value that is not one."""
    chosen = os.environ.get(VARIABLE, "").strip() or "default"
    if chosen not in MODES:
        raise TaxoclipError(f"{VARIABLE}={chosen}: use one of {', '.join(MODES)} (see taxoclip.allocator)")
    return chosen


@cache
def glibc():
    """The C library when it is glibc (it has malloc_trim and mallopt), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    except (OSError, AttributeError):  # musl and others
        return None
    return libc


def configure() -> str:
    """Set the allocator for ``mmap`` (the other modes act after each step); the mode in force."""
    chosen = mode()
    libc = glibc()
    if libc is None:
        return "default"
    if chosen == "mmap":
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, 0)
    return chosen


def after_step() -> None:
    """Once a training step is done: in ``trim`` mode, give the heap's free pages back."""
    if mode() == "trim" and (libc := glibc()) is not None:
        libc.malloc_trim(0)
