"""Helpers for runs in a real local POC system: find a site's processes, and kill a site (SIGKILL) at a chosen
moment of a running job, read from the server's ``progress.json`` (what ``nvflare-unlearn`` shows an operator).

Used by ``poc/run_poc.py`` (the dead-site measurement) and by ``tests/test_poc.py``. Only processes whose command
line names the POC workspace are touched: the POC system these runs start themselves.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from nvflare_unlearn.fl.defs import PROGRESS_FILE
from nvflare_unlearn.fl.processes import poc_processes


def poc_workspace() -> str:
    from nvflare.tool.poc.poc_commands import get_poc_workspace

    return os.path.realpath(get_poc_workspace())


def site_processes(workspace: str, site: str, job_only: bool = False) -> list[int]:
    """The Python processes of one POC site: its client process and the job processes it started (not the
    ``sub_start.sh`` supervisor, which restarts the client as a watchdog on a real machine would).
    ``job_only``: only the job processes (``worker_process``), the site's client process stays up."""
    pids = []
    for pid in poc_processes(workspace):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                tokens = [t.decode(errors="replace") for t in f.read().split(b"\0") if t]
        except OSError:
            continue
        if not tokens or "python" not in os.path.basename(tokens[0]):
            continue
        if not any(t.rstrip(os.sep).endswith(os.sep + site) or os.sep + site + os.sep in t for t in tokens):
            continue
        if job_only and not any("worker_process" in t for t in tokens):
            continue
        pids.append(pid)
    return pids


def server_progress(workspace: str) -> Optional[dict]:
    """The newest ``progress.json`` of a job on the POC server (None before the job writes one)."""
    paths = glob.glob(os.path.join(workspace, "*", "prod_*", "server", "*", PROGRESS_FILE))
    if not paths:
        return None
    try:
        with open(max(paths, key=os.path.getmtime)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


@dataclass
class Kill:
    """What the killer did: when, in which phase, which processes."""

    site: str
    when: str
    killed_at: Optional[float] = None
    progress: Optional[dict] = None
    pids: list[int] = field(default_factory=list)


def kill_site_when(
    site: str,
    when: str,
    condition: Callable[[dict], bool],
    timeout_s: float = 900.0,
    poll_s: float = 0.1,
    job_only: bool = False,
    workspace: Optional[str] = None,
) -> tuple[threading.Thread, Kill]:
    """Start a thread that SIGKILLs ``site``'s processes (all, or ``job_only``) as soon as the job's progress meets
    ``condition``; ``workspace``: the POC system's (default: NVFlare's configured POC workspace)."""
    kill = Kill(site=site, when=when)

    def watch() -> None:
        deadline = time.time() + timeout_s
        ws = os.path.realpath(workspace) if workspace else None
        while time.time() < deadline:
            if ws is None and os.path.isdir(os.path.dirname(poc_workspace())):
                ws = poc_workspace()
            progress = server_progress(ws) if ws else None
            if progress and condition(progress):
                pids = site_processes(ws, site, job_only=job_only)
                if pids:
                    for pid in pids:
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except OSError:
                            pass
                    kill.killed_at, kill.progress, kill.pids = time.time(), progress, pids
                    return
            time.sleep(poll_s)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread, kill


#: the two moments the dead-site measurement kills a site at
KILL_MOMENTS: dict[str, Callable[[dict], bool]] = {
    "activation": lambda p: p.get("phase") == "activation",
    "finetune": lambda p: p.get("phase") == "finetune" and (p.get("round") or 0) >= 2,
}
