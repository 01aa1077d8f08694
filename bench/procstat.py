"""CPU time of a process tree, read from /proc (no psutil).

`tree_cpu_seconds(pid)` is user + system time of the process, of every live
descendant, and of the children it has already waited for (cutime + cstime).
"""

from __future__ import annotations

import os
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    raw = Path(f"/proc/{pid}/stat").read_text()
    # the command name is in parentheses and may hold spaces: split after the last ")"
    return raw[raw.rindex(")") + 2 :].split()


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids += [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            continue
    return kids


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of `pid`, its live descendants and its reaped children."""
    total = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            fields = _stat_fields(current)
            pending += _children(current)
        except (OSError, ValueError):
            continue  # exited between listing and reading
        # fields[0] is field 3 (state); utime, stime, cutime, cstime are fields 14-17
        total += sum(int(f) for f in fields[11:15])
    return total / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0
