"""Running a job to its end in any environment, and reading its outputs wherever NVFlare put them.

``run_job(recipe, env, dest)`` is the one way the CLI (and anyone) runs a recipe in ``SimEnv``, ``PocEnv`` or
``ProdEnv``: it follows the job's progress (phase, round, U/R: ``progress.json`` in the simulator, the admin's
``show_stats`` elsewhere), downloads a POC / production result into ``dest`` BEFORE a POC system is stopped (a
``PocEnv`` cleans its workspace, and the admin's download folder with it, when it stops), and reports a job as
failed when NVFlare finished it as anything but ``FINISHED:COMPLETED`` or its record says it failed.

``read_job_result(folder)`` checks one result folder: for ``SimEnv`` the simulator workspace
(``<root>/<job>/server/simulate_job`` holds the server's run directory), for ``PocEnv`` / ``ProdEnv`` the downloaded
job result. The server writes ``unlearning_metrics.json`` and the model files into its run directory, so we look for
the metrics file below the folder. NVFlare's simulator can exit 0 after a failed job, so a missing file or
``status != "completed"`` is an error here, with the reason from the record or the server log.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from nvflare_unlearn.fl.defs import (
    FINAL_MODEL_FILE,
    GLOBAL_MODEL_FILE,
    METRICS_FILE,
    PLAN_FILE,
    PROGRESS_FILE,
    PROGRESS_STATS_GROUP,
    PRUNED_MODEL_FILE,
    RECORD_FILE,
)

_NO_ERROR = "no error found in the logs"
_AUTH_PATTERN = re.compile(r"not in allow_list|ComponentNotAuthorized|UnsafeComponentError")


@dataclass
class JobResult:
    """Paths of one finished job's outputs and its metrics record."""

    result_dir: str
    run_dir: str
    metrics_path: str
    metrics: dict
    model_path: str  # unlearned_model.pt (unlearning) or global_model.pt (pretrain / retrain)
    pruned_model_path: Optional[str] = None
    plan_path: Optional[str] = None
    tensorboard_dir: Optional[str] = None
    record_path: Optional[str] = None  # unlearning_record.json (unlearning jobs; audit.verify_record checks it)
    files: dict = field(default_factory=dict)
    job_id: Optional[str] = None
    status: Optional[str] = None  # NVFlare's final job status (POC / production; None in the simulator)

    @property
    def rounds(self) -> int:
        return int(self.metrics.get("rounds", 0))


def _find(root: str, filename: str) -> list[str]:
    hits = []
    for dirpath, _dirs, files in os.walk(root):
        if filename in files:
            hits.append(os.path.join(dirpath, filename))
    return sorted(hits, key=lambda p: (p.count(os.sep), p))


def _log_hint(root: str) -> str:
    """The most useful line of the server log when a job left no record (authorization errors first)."""
    for log in _find(root, "log.txt"):
        try:
            with open(log, errors="replace") as f:
                lines = f.readlines()
        except OSError:
            continue
        for line in lines:
            if _AUTH_PATTERN.search(line):
                return (
                    f"a site refused the plugin's components ({line.strip()[-300:]}); add 'nvflare_unlearn.fl' to "
                    "class_allow_list in each site's local/resources.json, or build the recipe with bundle_code=True"
                )
        errors = [ln.strip() for ln in lines if " ERROR " in ln or "Traceback" in ln]
        if errors:
            return f"first error in {log}: {errors[0][-400:]}"
    return _NO_ERROR


def read_job_result(result_dir: Optional[str]) -> JobResult:
    """Locate and check a finished job's outputs; raises RuntimeError when the job did not complete."""
    if not result_dir or not os.path.isdir(result_dir):
        raise RuntimeError(f"job result folder {result_dir!r} does not exist: the job did not run or was not fetched")
    hits = _find(result_dir, METRICS_FILE)
    if not hits:
        hint = _log_hint(result_dir)
        raise RuntimeError(f"the job wrote no {METRICS_FILE} under {result_dir}: it did not finish; {hint}")
    metrics_path = hits[0]
    run_dir = os.path.dirname(metrics_path)
    with open(metrics_path) as f:
        metrics = json.load(f)
    if metrics.get("status") != "completed":
        raise RuntimeError(f"the job failed: {metrics.get('error', 'no reason recorded')} (record: {metrics_path})")
    model_file = FINAL_MODEL_FILE if metrics.get("job_kind") == "unlearn" else GLOBAL_MODEL_FILE
    candidates = [os.path.join(run_dir, model_file)] + _find(result_dir, model_file)
    model_path = next((p for p in candidates if os.path.isfile(p)), None)
    if model_path is None:
        raise RuntimeError(f"the job completed but its model file {model_file} is missing under {result_dir}")
    pruned = os.path.join(run_dir, PRUNED_MODEL_FILE)
    plan = os.path.join(run_dir, PLAN_FILE)
    tb = os.path.join(run_dir, "tb_events")
    record = os.path.join(run_dir, RECORD_FILE)
    if metrics.get("job_kind") == "unlearn" and not os.path.isfile(record):
        raise RuntimeError(f"the unlearning job completed but wrote no audit record {RECORD_FILE} in {run_dir}")
    return JobResult(
        result_dir=result_dir,
        run_dir=run_dir,
        metrics_path=metrics_path,
        metrics=metrics,
        model_path=model_path,
        pruned_model_path=pruned if os.path.isfile(pruned) else None,
        plan_path=plan if os.path.isfile(plan) else None,
        tensorboard_dir=tb if os.path.isdir(tb) else None,
        record_path=record if os.path.isfile(record) else None,
        files={name: os.path.join(run_dir, name) for name in sorted(os.listdir(run_dir))},
    )


# ------------------------------------------------------------------------------------------------- running a job
#: NVFlare's status of a job that ended well; any other FINISHED:* status is a failure
COMPLETED = "FINISHED:COMPLETED"

Progress = Callable[[dict], None]


def run_job(
    recipe: Any,
    env: Any,
    dest: str,
    *,
    timeout: float = 0.0,
    on_progress: Optional[Progress] = None,
    poll_s: float = 5.0,
    stop_poc: bool = True,
) -> JobResult:
    """Run ``recipe`` in ``env`` (SimEnv, PocEnv or ProdEnv) to its end and return its checked result.

    POC / production: the job is followed through the admin API (its status and the controller's progress in
    ``show_stats``), its result is downloaded into ``dest`` while the system still runs, then a POC system is
    stopped (``stop_poc``) and its leftover processes ended. ``timeout`` > 0 aborts a job still running after that
    many seconds. Raises RuntimeError when NVFlare did not finish the job as ``FINISHED:COMPLETED`` or the job's
    record says it failed (the message gives the recorded error or the first error of the server log).
    """
    from nvflare.recipe.sim_env import SimEnv

    if isinstance(env, SimEnv):
        return _run_in_simulator(recipe, env, on_progress)
    return _run_in_system(recipe, env, dest, timeout, on_progress, poll_s, stop_poc)


def _run_in_simulator(recipe: Any, env: Any, on_progress: Optional[Progress]) -> JobResult:
    progress = os.path.join(env.workspace_root, recipe.name, "server", "simulate_job", PROGRESS_FILE)
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_file, args=(progress, stop, on_progress), daemon=True)
    if on_progress is not None:
        watcher.start()
    error = None
    try:
        run = recipe.run(env)
        result_dir = run.get_result()
    except RuntimeError as e:  # the simulator exited non-zero: the record or the log says why
        error, result_dir = e, os.path.join(env.workspace_root, recipe.name)
    finally:
        stop.set()
        if watcher.is_alive():
            watcher.join(timeout=5)
    try:
        return read_job_result(result_dir)
    except RuntimeError as e:
        raise RuntimeError(f"{e}{f' ({error})' if error else ''}") from None


def _watch_file(path: str, stop: threading.Event, on_progress: Progress) -> None:
    last = None
    while not stop.wait(1.0):
        try:
            with open(path) as f:
                current = json.load(f)
        except (OSError, ValueError):
            continue
        if current != last:
            last = current
            on_progress(current)


def _poc_admin_kit(poc_workspace: str) -> str:
    from nvflare.tool.poc.poc_commands import get_prod_dir, setup_service_config
    from nvflare.tool.poc.service_constants import FlareServiceConstants as SC

    project, services = setup_service_config(poc_workspace)
    return os.path.join(get_prod_dir(poc_workspace, project.get("name")), services.get(SC.FLARE_PROJ_ADMIN))


def all_sites_poc_env(num_clients: int, connect_timeout: float = 300.0, **kwargs: Any) -> Any:
    """NVFlare's ``PocEnv`` that submits the job only once all ``num_clients`` sites are connected.

    ``PocEnv.deploy`` starts the system and submits after 3 s with a 10 s login; on a loaded machine the server may
    not answer yet, or only some sites are connected, and NVFlare then deploys the job to those alone (as many as
    its ``min_clients``): the job would run, and be judged, without a site that was merely slow to start. This
    ``deploy`` is NVFlare's, with that wait in the middle.
    """
    from nvflare.recipe.poc_env import PocEnv
    from nvflare.recipe.utils import collect_non_local_scripts
    from nvflare.tool.poc.poc_commands import _start_poc, prepare_poc_provision

    class _AllSitesPocEnv(PocEnv):
        def deploy(self, job) -> str:
            non_local = collect_non_local_scripts(job)
            if non_local:
                raise ValueError(f"The following scripts do not exist locally: {non_local}")
            if self._check_poc_running():
                self.stop(clean_up=True)
            prepare_poc_provision(
                clients=self.clients or [],
                number_of_clients=self.num_clients,
                workspace=self.poc_workspace,
                docker_image=self.docker_image,
                use_he=self.use_he,
                project_conf_path=self.project_conf_path,
                examples_dir=None,
            )
            _start_poc(
                poc_workspace=self.poc_workspace, gpu_ids=self.gpu_ids, excluded=[self.username], services_list=[]
            )
            wait_for_sites(self, self.num_clients, connect_timeout)
            return self._get_session_manager().submit_job(job)

    extra = {"login_timeout": 60, **(kwargs.pop("extra", None) or {})}
    return _AllSitesPocEnv(num_clients=num_clients, extra=extra, **kwargs)


def wait_for_sites(env: Any, num_clients: int, timeout: float = 300.0) -> None:
    """Wait until the system's server accepts connections and ``num_clients`` sites are connected (RuntimeError after
    ``timeout`` s). The admin port is probed with a plain socket first: a Flare API login tried before the server
    listens leaves that process unable to log in later."""
    import socket

    from nvflare.recipe.poc_env import PocEnv

    deadline = time.time() + timeout
    kit = _poc_admin_kit(env.poc_workspace) if isinstance(env, PocEnv) else env.startup_kit_location
    with open(os.path.join(kit, "startup", "fed_admin.json")) as f:
        admin = json.load(f)["admin"]
    while True:
        try:
            socket.create_connection((admin["host"], int(admin["port"])), timeout=2.0).close()
            break
        except OSError:
            if time.time() > deadline:
                raise RuntimeError(
                    f"the server at {admin['host']}:{admin['port']} did not start in {timeout:g} s"
                ) from None
            time.sleep(1.0)
    time.sleep(2.0)
    connected: list = []
    sess = _admin_session(env, login_timeout=max(10.0, deadline - time.time()))
    try:
        while time.time() < deadline:
            connected = sess.get_connected_client_list() or []
            if len(connected) >= num_clients:
                return
            time.sleep(1.0)
    finally:
        sess.close()
    raise RuntimeError(f"only {len(connected)} of {num_clients} site(s) connected after {timeout:g} s")


def _admin_session(env: Any, login_timeout: float = 60.0):
    """A Flare API session as the environment's admin user (POC: the admin kit of the running POC system)."""
    from nvflare.fuel.flare_api.flare_api import new_secure_session
    from nvflare.recipe.poc_env import PocEnv

    if isinstance(env, PocEnv):
        kit = _poc_admin_kit(env.poc_workspace)
    else:
        kit = env.startup_kit_location
    return new_secure_session(username=env.username, startup_kit_location=kit, timeout=login_timeout, study=env.study)


def _server_progress(sess: Any, job_id: str) -> Optional[dict]:
    try:
        stats = sess.show_stats(job_id, "server") or {}
    except Exception:  # the job may be starting or ending: progress is best effort
        return None
    for value in stats.values():
        if isinstance(value, dict) and isinstance(value.get(PROGRESS_STATS_GROUP), dict):
            return value[PROGRESS_STATS_GROUP]
    return None


def _run_in_system(recipe, env, dest, timeout, on_progress, poll_s, stop_poc) -> JobResult:
    from nvflare.recipe.poc_env import PocEnv

    try:
        run = recipe.run(env)  # POC: provisions and starts a fresh system first
    except Exception:
        if isinstance(env, PocEnv) and stop_poc:  # a system that started but took no job is not left running
            stop_poc_system(env)
        raise
    job_id = run.get_job_id()
    started = time.time()
    status, aborted, result_dir, last = None, False, None, None
    try:
        sess = _admin_session(env)
        try:
            while True:
                status = str(sess.get_job_meta(job_id).get("status", ""))
                if status.startswith("FINISHED"):
                    break
                if on_progress is not None:
                    current = _server_progress(sess, job_id)
                    if current and current != last:
                        last = current
                        on_progress(current)
                if timeout and not aborted and time.time() - started > timeout:
                    sess.abort_job(job_id)
                    aborted = True
                time.sleep(poll_s)
            os.makedirs(dest, exist_ok=True)
            result_dir = sess.download_job_result(job_id, destination=dest)  # before anything is stopped
        finally:
            sess.close()
    finally:
        if isinstance(env, PocEnv) and stop_poc:
            stop_poc_system(env)
    try:
        result = read_job_result(result_dir)
    except RuntimeError as e:
        raise RuntimeError(f"NVFlare finished job {job_id} as {status}: {e}") from None
    if aborted:
        raise RuntimeError(f"job {job_id} ran past timeout={timeout:g} s and was aborted ({status})")
    if status != COMPLETED:
        raise RuntimeError(
            f"NVFlare finished job {job_id} as {status}, not {COMPLETED}; {_dropped_sites(result.metrics)}"
            f"the workflow's own record says completed (outputs kept in {result.run_dir})"
            + ("" if (hint := _log_hint(result_dir)) == _NO_ERROR else f"; {hint}")
        )
    result.job_id, result.status = job_id, status
    return result


def sites_per_phase(m: dict) -> list[dict]:
    """Which sites each activation pass and each round used, and which gave no result, from a job's record."""
    phases = [
        dict(phase=f"activation class {a.get('forget_class')}", used=a.get("sites"), no_result=a.get("no_result"))
        for a in m.get("activation_rounds", [])
    ]
    phases += [
        dict(phase=f"round {r.get('round')}", used=r.get("trained_sites"), no_result=r.get("no_result"))
        for r in m.get("per_round", [])
    ]
    return [{k: (v or []) if k != "phase" else v for k, v in p.items()} for p in phases]


def _dropped_sites(m: dict) -> str:
    """Which sites gave no result, and which ones every phase used (NVFlare ends a job as FINISHED:ABNORMAL when a
    site that took part has no outcome, e.g. its processes died)."""
    phases = sites_per_phase(m)
    missing = sorted({s for p in phases for s in p["no_result"]})
    if not missing:
        return ""
    first = next(p["phase"] for p in phases if p["no_result"])
    used = "; ".join(f"{p['phase']}: {', '.join(p['used'])}" for p in phases)
    return (
        f"site(s) {missing} gave no result from {first} on (a site that died has no outcome for NVFlare); "
        f"sites used: {used}; "
    )


def stop_poc_system(env: Any, wait_s: float = 30.0) -> list[int]:
    """Stop a POC system (keeping its workspace and logs) and end what is left of its processes.

    NVFlare's POC can leave server or site processes behind (a site restarted by its supervisor after a crash does
    not always go down with ``poc stop``); they are found by the POC workspace in their command line and sent
    SIGTERM, then SIGKILL. Returns the ids of the processes that had to be ended.
    """
    import signal

    try:
        env.stop(clean_up=False)
    except Exception:  # stopping is best effort; what is left is ended below
        pass
    workspace = os.path.realpath(env.poc_workspace)
    deadline = time.time() + wait_s
    while time.time() < deadline and poc_processes(workspace):
        time.sleep(1.0)
    ended = poc_processes(workspace)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in poc_processes(workspace):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        time.sleep(2.0)
    return ended


def poc_processes(workspace: str) -> list[int]:
    """Ids of this user's processes whose command line names the POC workspace (server, sites, supervisors)."""
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
