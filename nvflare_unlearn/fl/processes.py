"""The processes a local system of ours started, followed by their ids so that only they are ever ended.

A POC service is a supervisor (the startup kit's ``sub_start.sh``) that starts the server or client process, which
starts a job process per job in a new session (NVFlare's ``spawn_process`` uses ``setsid``), so neither a process
group nor a command line names exactly what we started: the command line of another user's POC system, or of any
process that mentions the same folder, looks the same. ``ProcessTracker`` follows the descendants of the processes
we started through their parent ids while they run (a child whose parent died is reparented and would be lost) and
records each with its start time, so an id the kernel gave to an unrelated process later is never signalled. Linux
(``/proc``); elsewhere it follows only the processes added to it.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Optional


def _process_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent id, start time in clock ticks since boot, state) of every process we can read."""
    table = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state ppid ... starttime (field 22)
        table[int(entry)] = (int(fields[1]), int(fields[19]), fields[0])
    return table


class ProcessTracker:
    """Ids (with start times) of the processes added to it and of all their descendants, refreshed every
    ``interval`` s in a daemon thread until ``end``."""

    def __init__(self, interval: float = 1.0):
        self._known: dict[int, Optional[int]] = {}  # pid -> start time (None where /proc is missing)
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._interval = interval
        self._thread: Optional[threading.Thread] = None

    def add(self, pid: int) -> None:
        """Follow ``pid`` (a process we started) and, from now on, its descendants."""
        start = _process_table().get(pid, (0, None, ""))[1]
        with self._lock:
            self._known[pid] = start
        if self._thread is None:
            self._thread = threading.Thread(target=self._follow, name="nvflare-unlearn-process-tracker", daemon=True)
            self._thread.start()

    def alive(self) -> list[int]:
        """The followed processes still running (zombies excluded), after recording any new descendant."""
        table = _process_table()
        with self._lock:
            if not table:  # no /proc: only the processes added, by id
                return sorted(p for p in self._known if _exists(p))
            live = {p for p, start in self._known.items() if p in table and table[p][1] == start and table[p][2] != "Z"}
            children: dict[int, list[int]] = {}
            for pid, (ppid, _start, _state) in table.items():
                children.setdefault(ppid, []).append(pid)
            frontier = list(live)
            while frontier:
                for child in children.get(frontier.pop(), []):
                    if child not in live and table[child][2] != "Z":
                        self._known.setdefault(child, table[child][1])
                        live.add(child)
                        frontier.append(child)
            return sorted(live)

    def end(self, wait_s: float = 30.0) -> list[int]:
        """Wait up to ``wait_s`` for the followed processes to exit, then SIGTERM and SIGKILL those left; returns
        their ids (empty when everything exited by itself)."""
        deadline = time.time() + wait_s
        while time.time() < deadline and self.alive():
            time.sleep(1.0)
        left = self.alive()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.alive():
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
            time.sleep(2.0)
        self._stopped.set()
        return left

    def _follow(self) -> None:
        while not self._stopped.wait(self._interval):
            self.alive()


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def poc_processes(workspace: str) -> list[int]:
    """Ids of this user's processes whose command line names ``workspace``: for looking at a running system (the
    dead-site harness picks a site's processes with it); never used to stop one, where another process may name
    the same folder."""
    found = []
    me = os.getpid()
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if workspace in cmd:
            found.append(int(entry))
    return sorted(found)
