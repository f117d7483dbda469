"""CPU seconds of every process a measurement starts, detached background workers included.

``resource.getrusage(RUSAGE_CHILDREN)`` only sees children that were waited for, and a worker that detaches
(double fork, ``setsid``) is re-parented away from us and never is. So the benchmark makes itself a *child
subreaper* (``prctl(PR_SET_CHILD_SUBREAPER)``): every orphan among its descendants is re-parented to it, not to
PID 1. A measurement then counts (a) the rusage of every descendant reaped while it ran and (b) the CPU that
still-running descendants used meanwhile, read from ``/proc/PID/stat``. Service process trees (the S3 emulator,
PostgreSQL servers) are excluded and measured on their own.
"""

from __future__ import annotations

import ctypes
import os
import resource
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>
TICK = float(os.sysconf("SC_CLK_TCK"))


def become_subreaper() -> None:
    """Make orphaned descendants of this process our children (Linux ≥ 3.4)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


@dataclass(frozen=True)
class ProcInfo:
    ppid: int
    state: str
    cpu: float  # utime + stime + cutime + cstime, seconds: its own CPU and that of the children it reaped


def _read_stat(pid: int) -> ProcInfo | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
    ticks = sum(int(x) for x in fields[11:15])
    return ProcInfo(ppid=int(fields[1]), state=fields[0], cpu=ticks / TICK)


def all_processes() -> dict[int, ProcInfo]:
    table: dict[int, ProcInfo] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = _read_stat(int(entry))
            if info is not None:
                table[int(entry)] = info
    return table


def subtree(table: dict[int, ProcInfo], roots: Iterable[int]) -> set[int]:
    """``roots`` and all their descendants present in ``table``."""
    children: dict[int, list[int]] = {}
    for pid, info in table.items():
        children.setdefault(info.ppid, []).append(pid)
    found: set[int] = set()
    todo = [r for r in roots if r in table]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, ()))
    return found


def tree_cpu(roots: Iterable[int]) -> float:
    """CPU seconds so far of the live processes in the trees rooted at ``roots``."""
    table = all_processes()
    return sum(table[pid].cpu for pid in subtree(table, roots))


def reap_orphans(keep: Iterable[int] = ()) -> None:
    """Wait for every zombie child of ours (re-parented orphans) except ``keep``, adding it to our rusage."""
    me, kept = os.getpid(), set(keep)
    for pid, info in all_processes().items():
        if info.ppid == me and info.state == "Z" and pid not in kept:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass  # someone else (subprocess) waited for it first


def system_cpu() -> float:
    """Busy CPU seconds of the whole machine so far (``/proc/stat``: everything but idle and iowait)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:8]]
    return (sum(fields) - fields[3] - fields[4]) / TICK


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class CpuMeter:
    """``start()``, run the commands, ``stop()``: ``seconds`` is the CPU of everything they started.

    ``services`` returns the PIDs of the process trees to leave out (and to measure apart as ``service_seconds``).
    ``stop`` first waits up to ``settle`` seconds for new descendants (detached workers) to exit.
    """

    services: Callable[[], list[int]]
    settle: float = 60.0
    seconds: float = 0.0
    service_seconds: float = 0.0
    unfinished: int = 0  # workers still running when the settle time ran out (their CPU so far is counted)
    system_seconds: float = 0.0  # the whole machine's busy CPU meanwhile: a cross-check (other load included)
    _before: dict[int, float] = field(default_factory=dict)
    _children: float = 0.0
    _service: float = 0.0
    _system: float = 0.0

    def _ours(self) -> dict[int, float]:
        table = all_processes()
        me = os.getpid()
        excluded = subtree(table, self.services())
        return {p: table[p].cpu for p in subtree(table, [me]) - excluded - {me}}

    def start(self) -> None:
        reap_orphans(self.services())
        self._before = self._ours()
        self._children = _children_cpu()
        self._service = tree_cpu(self.services())
        self._system = system_cpu()

    def wait_workers(self) -> int:
        """Wait up to ``settle`` s for descendants started since ``start()`` to exit; how many are left."""
        deadline = time.monotonic() + self.settle
        while True:
            reap_orphans(self.services())
            live = [p for p in self._ours() if p not in self._before]
            if not live or time.monotonic() > deadline:
                return len(live)
            time.sleep(0.2)

    def stop(self) -> None:
        self.unfinished = self.wait_workers()
        now = self._ours()
        still = sum(now[p] - self._before.get(p, 0.0) for p in now)
        self.seconds = _children_cpu() - self._children + still
        self.service_seconds = tree_cpu(self.services()) - self._service
        self.system_seconds = system_cpu() - self._system
