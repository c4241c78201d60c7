"""Make freed memory go back to the operating system promptly (imported before polars).

A trace analysis allocates and frees hundreds of MB of temporary columns and arrays in a
few seconds. Two allocators would otherwise keep what was freed, so that the process's
resident size (what a job scheduler or the OOM killer sees) is the sum of many
temporaries rather than the largest of them:

- polars allocates through its own jemalloc, which returns freed pages only after a delay
  (polars sets 0.5 s, then 1 s more). Decay times of 0 return them at once. jemalloc reads
  its configuration when polars loads, so this must run before ``import polars``; a user's
  own ``_RJEM_MALLOC_CONF`` wins, and nothing changes if polars is already loaded.
- glibc's ``malloc`` (numpy arrays, Python buffers) raises its mmap threshold up to 32 MB
  as large blocks are freed, after which large arrays come from the heap, which is rarely
  given back. A fixed threshold keeps every block of 128 KiB or more in its own mapping,
  returned when freed.

Measured on the 318 MiB H200 trace (``/usr/bin/time``, same code otherwise): the peak of
``analyze`` fell from 550 to 333 MiB, for about 15% more time (``docs/performance.md``).
polars prepends its own defaults to ``_RJEM_MALLOC_CONF`` when it loads; jemalloc takes the
last value of each option, so these (or the user's) win.
"""

from __future__ import annotations

import ctypes
import os
import sys

#: jemalloc options used when the user has set none.
JEMALLOC_CONF = "dirty_decay_ms:0,muzzy_decay_ms:0"
#: glibc ``mallopt`` parameters (malloc.h) and the threshold used.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 128 * 1024


def configure() -> None:
    """Apply both settings; safe to call more than once, and a no-op off Linux."""
    if "polars" not in sys.modules:
        os.environ.setdefault("_RJEM_MALLOC_CONF", JEMALLOC_CONF)
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        pass


def release_freed_memory() -> None:
    """Give the memory freed while reading a trace, or by an analysis phase, back to the
    operating system.

    Decoding frees millions of small Python objects (names, structs); glibc's allocator
    keeps the freed heap for reuse, where it would count towards the process's size for
    the rest of the analysis. ``malloc_trim`` returns it (tens of MB on a 300 MB trace).
    A no-op where the C library has no such call.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
