"""uspsjax: train whole populations of USPS digit classifiers at once with jit + vmap.

`uspsjax.run(sweep, ...)` trains a sweep and returns its `uspsjax.Run`; `uspsjax.load(folder)`
reads one back (`uspsjax.api`).

With `USPSJAX_KEEP_FREED_MEMORY=1`, importing the package tells glibc's malloc to keep the memory
it frees (`keep_freed_memory`). By default glibc serves each block over 32 MiB with a new `mmap`
that the kernel zero-fills page by page, which makes fresh large XLA:CPU buffers slow. The
training loop allocates once per call of many steps, so on the LC step this changed nothing at
batch 16 and gave 1.33x at batch 1024, where it also raised peak memory from 3.3 GB to up to
7.3 GB (results/bench/NOTES.md, section 7): off unless asked for.
"""

import ctypes
import os
import platform


def keep_freed_memory() -> bool:
    """Make glibc's malloc reuse freed memory: one arena, no `mmap` for large blocks, no trimming
    of the heap (what `MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...` do, but
    set from inside the process, so no launcher has to export them). Best called before the first
    large allocation. Returns whether it applied: only with `USPSJAX_KEEP_FREED_MEMORY=1`, on
    glibc.

    The cost is memory: the heap keeps its high-water size until the process exits.
    """
    if os.environ.get("USPSJAX_KEEP_FREED_MEMORY") != "1" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # glibc's malloc.h
    # A trim threshold of -1 turns trimming off (mallopt(3)).
    return all(mallopt(param, value) == 1 for param, value in
               ((m_arena_max, 1), (m_mmap_max, 0), (m_trim_threshold, -1)))


KEEPS_FREED_MEMORY = keep_freed_memory()


def __getattr__(name):
    # `uspsjax.run`, `uspsjax.load` and `uspsjax.Run` (uspsjax.api) on first use, so that
    # importing a light module such as uspsjax.data does not import JAX.
    if name in ("run", "load", "Run"):
        from uspsjax import api
        return getattr(api, name)
    raise AttributeError(f"module 'uspsjax' has no attribute {name!r}")
