"""Running a job to its end in any environment (reading its outputs: ``results``; the POC system: ``poc``).

``run_job(recipe, env, dest)`` is the one way the CLI (and anyone) runs a recipe in ``SimEnv``, ``PocEnv`` or
``ProdEnv``: it follows the job's progress (phase, round, U/R: ``progress.json`` in the simulator, the admin's
``show_stats`` elsewhere), downloads a POC / production result into ``dest`` BEFORE a POC system is stopped (a
``PocEnv`` cleans its workspace, and the admin's download folder with it, when it stops), and reports a job as
failed when NVFlare finished it as anything but ``FINISHED:COMPLETED`` or its record says it failed.

Progress reaches ``on_progress`` as a ``JobProgress``: a dict whose ``str()`` is one readable line
(``progress_line``), so ``on_progress=print`` prints one line per phase, activation pass and evaluated round.
NVFlare's own console log goes to the job's log files unless ``verbose=True``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any, Callable, Mapping, Optional

from nvflare_unlearn.fl.defs import PROGRESS_FILE, PROGRESS_STATS_GROUP
from nvflare_unlearn.fl.results import NO_ERROR, JobResult, dropped_sites, log_hint, read_job_result

#: NVFlare's status of a job that ended well; any other FINISHED:* status is a failure
COMPLETED = "FINISHED:COMPLETED"

Progress = Callable[[dict], None]

#: the simulator's console level when ``run_job`` quiets it (the log files keep everything)
QUIET_CONSOLE_LEVEL = "ERROR"


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{100 * float(value):.1f}%"


def progress_line(p: Mapping[str, Any], started: Optional[float] = None) -> str:
    """One line a person can follow: phase, round, U/R of the latest evaluation, elapsed, estimate to the phase end.

    Elapsed is counted from ``started`` (a ``time.time()``) when given, else from the job's own start as the
    controller recorded it (so the line depends on the update alone)."""
    parts = [f"phase {p.get('phase', '?')}"]
    if p.get("phase") == "activation" and p.get("forget_class") is not None:
        parts.append(f"class {p['forget_class']}")
    if p.get("num_rounds") and p.get("phase") not in ("start", "activation", "done"):
        parts.append(f"round {p.get('round', 0)}/{p['num_rounds']}")
    if p.get("evaluated"):
        parts.append(f"{p['evaluated']}: U {_pct(p.get('u_acc'))} R {_pct(p.get('r_acc'))}")
    if started is not None:
        parts.append(f"elapsed {time.time() - started:.0f} s")
    elif p.get("started") is not None and p.get("updated") is not None:
        parts.append(f"elapsed {p['updated'] - p['started']:.0f} s")
    done, total = p.get("rounds_done") or 0, p.get("num_rounds") or 0
    if done and total > done and p.get("phase_started") and p.get("updated"):
        per_round = (p["updated"] - p["phase_started"]) / done
        parts.append(f"about {per_round * (total - done):.0f} s left in this phase")
    return ", ".join(parts)


class JobProgress(dict):
    """One progress update of a running job: the controller's fields (phase, forget_class, round, num_rounds,
    rounds_done, evaluated, u_acc, r_acc, started, phase_started, updated), printed as ``progress_line``."""

    def __str__(self) -> str:
        return progress_line(self)

    def milestone(self) -> tuple:
        """What changes once per phase, activation pass or round: ``run_job`` reports only these changes, one line
        each (a line carries the latest evaluation, so the last round's shows on the next phase's line). A round's
        state lasts the whole round, so a periodic read does not miss it, where an evaluation's can be overtaken by
        the next phase between two reads."""
        return tuple(self.get(k) for k in ("phase", "forget_class", "pass_index", "round"))


def run_job(
    recipe: Any,
    env: Any,
    dest: str,
    *,
    timeout: float = 0.0,
    on_progress: Optional[Progress] = None,
    poll_s: float = 5.0,
    stop_poc: bool = True,
    verbose: bool = False,
) -> JobResult:
    """Run ``recipe`` in ``env`` (SimEnv, PocEnv or ProdEnv) to its end and return its checked result.

    POC / production: the job is followed through the admin API (its status and the controller's progress in
    ``show_stats``), its result is downloaded into ``dest`` while the system still runs, then a POC system is
    stopped (``stop_poc``) and what is left of the processes it started ended. The private workspace of a
    ``PrivatePocEnv`` is removed after a job that completed and kept, with its logs, after one that did not (the
    error names it). ``timeout`` > 0 aborts a job still running after that many seconds. Raises RuntimeError when
    NVFlare did not finish the job as ``FINISHED:COMPLETED`` or the job's record says it failed (the message gives
    the recorded error or the first error of the server log).

    ``on_progress`` gets a ``JobProgress`` at each new phase, activation pass and evaluation (``print`` gives
    readable lines). In the simulator, NVFlare's console log is kept to errors (everything still goes to the
    sites' and the server's ``log.txt``) unless ``verbose`` or the ``SimEnv`` has a ``log_config`` of its own.
    """
    from nvflare.recipe.sim_env import SimEnv

    if isinstance(env, SimEnv):
        return _run_in_simulator(recipe, env, on_progress, verbose)
    return _run_in_system(recipe, env, dest, timeout, on_progress, poll_s, stop_poc)


def _quiet_log_config(env: Any) -> Optional[str]:
    """A log config that keeps the simulator's console to errors, or None where none can be written (NVFlare
    passes it on a command line: no spaces in the path)."""
    from nvflare_unlearn.fl.job_utils import quiet_log_config

    try:
        return quiet_log_config(env.workspace_root, QUIET_CONSOLE_LEVEL)
    except (OSError, ValueError):
        return None


def _run_in_simulator(recipe: Any, env: Any, on_progress: Optional[Progress], verbose: bool = False) -> JobResult:
    progress = os.path.join(env.workspace_root, recipe.name, "server", "simulate_job", PROGRESS_FILE)
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_file, args=(progress, stop, on_progress), daemon=True)
    if on_progress is not None:
        watcher.start()
    error = None
    own_log_config = env.log_config
    if own_log_config is None and not verbose:
        env.log_config = _quiet_log_config(env)
    try:
        run = recipe.run(env)  # the simulator runs the job to its end here
        # the result folder without ``run.get_result()``: in the simulator it only adds a console note
        result_dir = env.get_job_result(run.get_job_id())
    except RuntimeError as e:  # the simulator exited non-zero: the record or the log says why
        error, result_dir = e, os.path.join(env.workspace_root, recipe.name)
    finally:
        env.log_config = own_log_config
        stop.set()
        if watcher.is_alive():
            watcher.join(timeout=5)
    try:
        return read_job_result(result_dir)
    except RuntimeError as e:
        raise RuntimeError(f"{e}{f' ({error})' if error else ''}") from None


def _watch_file(path: str, stop: threading.Event, on_progress: Progress) -> None:
    report = _Reporter(on_progress)
    while True:
        stopping = stop.wait(1.0)
        try:
            with open(path) as f:
                report(json.load(f))
        except (OSError, ValueError):
            pass
        if stopping:  # one last read: the job's final state ("done") is shown too
            return


class _Reporter:
    """Passes an update on when its milestone changed (``JobProgress.milestone``)."""

    def __init__(self, on_progress: Progress):
        self.on_progress, self.last = on_progress, None

    def __call__(self, current: Any) -> None:
        if not isinstance(current, dict):
            return
        update = JobProgress(current)
        if update.milestone() != self.last:
            self.last = update.milestone()
            self.on_progress(update)


def _admin_session(env: Any, login_timeout: float = 60.0) -> Any:
    from nvflare_unlearn.fl.poc import admin_session

    return admin_session(env, login_timeout)


def _server_progress(sess: Any, job_id: str) -> Optional[dict]:
    try:
        stats = sess.show_stats(job_id, "server") or {}
    except Exception:  # the job may be starting or ending: progress is best effort
        return None
    for value in stats.values():
        if isinstance(value, dict) and isinstance(value.get(PROGRESS_STATS_GROUP), dict):
            return value[PROGRESS_STATS_GROUP]
    return None


def _is_poc(env: Any) -> bool:
    from nvflare.recipe.poc_env import PocEnv

    return isinstance(env, PocEnv)


def _stop(env: Any) -> None:
    from nvflare_unlearn.fl.poc import stop_poc_system

    stop_poc_system(env)


def _run_in_system(recipe, env, dest, timeout, on_progress, poll_s, stop_poc) -> JobResult:
    stop_here = _is_poc(env) and stop_poc
    try:
        run = recipe.run(env)  # POC: provisions and starts a fresh system first
    except Exception:
        if stop_here:  # a system that started but took no job is not left running
            _stop(env)
        raise
    job_id = run.get_job_id()
    started = time.time()
    status, aborted, result_dir = None, False, None
    report = _Reporter(on_progress) if on_progress is not None else None
    try:
        sess = _admin_session(env)
        try:
            while True:
                status = str(sess.get_job_meta(job_id).get("status", ""))
                if status.startswith("FINISHED"):
                    break
                if report is not None:
                    current = _server_progress(sess, job_id)
                    if current:
                        report(current)
                if timeout and not aborted and time.time() - started > timeout:
                    sess.abort_job(job_id)
                    aborted = True
                time.sleep(poll_s)
            os.makedirs(dest, exist_ok=True)
            result_dir = sess.download_job_result(job_id, destination=dest)  # before anything is stopped
        finally:
            sess.close()
    finally:
        if stop_here:
            _stop(env)
    kept = f" (POC workspace with the system's logs kept: {env.poc_workspace})" if _own_workspace(env) else ""
    try:
        result = read_job_result(result_dir)
    except RuntimeError as e:
        raise RuntimeError(f"NVFlare finished job {job_id} as {status}: {e}{kept}") from None
    if aborted:
        raise RuntimeError(f"job {job_id} ran past timeout={timeout:g} s and was aborted ({status}){kept}")
    if status != COMPLETED:
        raise RuntimeError(
            f"NVFlare finished job {job_id} as {status}, not {COMPLETED}; {dropped_sites(result.metrics)}"
            f"the workflow's own record says completed (outputs kept in {result.run_dir})"
            + ("" if (hint := log_hint(result_dir)) == NO_ERROR else f"; {hint}")
            + kept
        )
    if stop_here and _own_workspace(env):
        env.remove_workspace()
    result.job_id, result.status = job_id, status
    return result


def _own_workspace(env: Any) -> bool:
    """Whether ``env`` is a ``PrivatePocEnv`` in a workspace it made itself (removed after a completed job)."""
    from nvflare_unlearn.fl.poc import PrivatePocEnv

    return isinstance(env, PrivatePocEnv) and env.own_workspace
