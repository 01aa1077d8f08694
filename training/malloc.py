"""glibc malloc settings for a training process on the CPU."""

from __future__ import annotations

import ctypes
import platform


def reuse_freed_memory() -> None:
    """Keep freed memory in the process instead of handing it back to the OS (glibc).

    A step allocates and frees logits-sized buffers (256 MB for the book's batch). glibc
    serves blocks that large with fresh mmap pages, so every step pays page faults for
    them: a third of the CPU time of a step on two cores. Turning mmap off for malloc and
    never trimming the heap lets each step reuse the last one's memory.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    m_trim_threshold, m_mmap_max = -1, -4  # from <malloc.h>
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**31 - 1)
