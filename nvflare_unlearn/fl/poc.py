"""A local POC system that is safe beside others, built on NVFlare's public API only.

NVFlare's ``PocEnv`` runs every system in one shared workspace (``nvflare poc config``'s, by default
``/tmp/nvflare/poc``) on the default ports 8002 / 8003, stops whatever system runs there before it deploys, and submits
3 s after starting the services, with some sites perhaps not yet connected (NVFlare then deploys the job to those
alone). ``PrivatePocEnv`` subclasses it (the class the recipes and ``run_job`` recognise) and replaces ``deploy`` /
``stop`` with public pieces: ``prepare_poc_provision`` provisions a private workspace with free ports, each service's
startup kit script (``startup/sub_start.sh``, what ``start.sh`` puts in the background) runs as OUR child process,
the job is submitted through NVFlare's ``SessionManager`` once every site is connected, and ``stop`` shuts the
system down through the admin API (``shutdown_system``) and then ends, by id, only the processes that this
environment started and their descendants (``ProcessTracker``). A system it did not start is never stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any, Optional

from nvflare.fuel.flare_api.flare_api import new_secure_session
from nvflare.lighter.provision import gen_default_project_config
from nvflare.lighter.utils import load_yaml
from nvflare.recipe.poc_env import PocEnv
from nvflare.recipe.session_mgr import SessionManager
from nvflare.recipe.utils import collect_non_local_scripts
from nvflare.tool.api_utils import shutdown_system
from nvflare.tool.poc.poc_commands import (
    add_he_builder,
    client_gpu_assignments,
    get_prod_dir,
    is_poc_running,
    prepare_poc_provision,
    save_project_config,
    setup_service_config,
    update_clients,
    update_server_name,
)
from nvflare.tool.poc.service_constants import FlareServiceConstants as SC

from nvflare_unlearn.fl.processes import ProcessTracker


def free_ports(n: int = 2) -> list[int]:
    """``n`` distinct TCP ports nothing listens on now (the OS picks them; all are held until all are picked)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def system_running(workspace: str) -> bool:
    """Whether a POC system (anyone's) runs in ``workspace``: NVFlare's own check of the server's pid files."""
    try:
        project, services = setup_service_config(workspace)
    except Exception:  # no project.yml: nothing was ever provisioned there
        return False
    return bool(project and services) and is_poc_running(workspace, services, project)


def admin_kit(env: Any) -> str:
    """The admin startup kit of ``env``: a POC workspace's project admin, or a ``ProdEnv``'s kit."""
    if not isinstance(env, PocEnv):
        return env.startup_kit_location
    project, services = setup_service_config(env.poc_workspace)
    return os.path.join(get_prod_dir(env.poc_workspace, project.get("name")), services[SC.FLARE_PROJ_ADMIN])


def admin_session(env: Any, login_timeout: float = 60.0) -> Any:
    """A Flare API session as the environment's admin user."""
    return new_secure_session(
        username=env.username, startup_kit_location=admin_kit(env), timeout=login_timeout, study=env.study
    )


def wait_for_sites(env: Any, num_clients: int, timeout: float = 300.0) -> None:
    """Wait until the system's server accepts connections and ``num_clients`` sites are connected (RuntimeError after
    ``timeout`` s). The admin port is probed with a plain socket first: a Flare API login tried before the server
    listens leaves that process unable to log in later."""
    deadline = time.time() + timeout
    with open(os.path.join(admin_kit(env), "startup", "fed_admin.json")) as f:
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
    sess = admin_session(env, login_timeout=max(10.0, deadline - time.time()))
    try:
        while time.time() < deadline:
            connected = sess.get_connected_client_list() or []
            if len(connected) >= num_clients:
                return
            time.sleep(1.0)
    finally:
        sess.close()
    raise RuntimeError(f"only {len(connected)} of {num_clients} site(s) connected after {timeout:g} s")


class PrivatePocEnv(PocEnv):
    """NVFlare's ``PocEnv`` in a workspace and on ports of its own, submitting only once every site is connected.

    ``workspace``: None (default) = a new folder under the temp dir for this environment; a path = that folder (a
    system someone else runs there is left alone: ``deploy`` refuses). ``ports``: None (default) = two free ports
    for the server's federated-learning and admin endpoints; ``(fl_port, admin_port)`` = those (NVFlare's defaults are
    8002 / 8003). A ``project_conf_path`` is used as given, ports included. ``connect_timeout``: seconds to wait for
    the server and every site before the job is submitted. Docker POC systems are not supported (use ``PocEnv``).
    """

    def __init__(
        self,
        *,
        num_clients: Optional[int] = 2,
        workspace: Optional[str] = None,
        ports: Optional[tuple[int, int]] = None,
        connect_timeout: float = 300.0,
        **kwargs: Any,
    ):
        extra = {"login_timeout": 60, **(kwargs.pop("extra", None) or {})}
        super().__init__(num_clients=num_clients, extra=extra, **kwargs)
        if self.docker_image:
            raise ValueError("PrivatePocEnv starts the sites as local processes: use NVFlare's PocEnv for docker")
        self.own_workspace = workspace is None
        name = f"nvflare_unlearn_poc_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        self.poc_workspace = os.path.realpath(workspace or os.path.join(tempfile.gettempdir(), name))
        self.ports = tuple(ports) if ports else None
        self.connect_timeout = connect_timeout
        self.tracker: Optional[ProcessTracker] = None
        self._services: dict[str, subprocess.Popen] = {}

    # ------------------------------------------------------------------------------------------ ExecEnv's contract
    def deploy(self, job: Any) -> str:
        """Provision and start a fresh system of our own, wait for every site, submit ``job``; returns its id."""
        missing = collect_non_local_scripts(job)
        if missing:
            raise ValueError(f"The following scripts do not exist locally: {missing}")
        if self._services:  # a system this environment started before: replaced, as PocEnv does
            self.stop()
        if system_running(self.poc_workspace):
            raise RuntimeError(
                f"a POC system this environment did not start runs in {self.poc_workspace}; it is left alone: stop "
                "it yourself (nvflare poc stop) or give PrivatePocEnv another workspace (the default is a new one)"
            )
        try:
            self._provision()
            self._start_services()
            wait_for_sites(self, self.num_clients, self.connect_timeout)
            return self._sessions().submit_job(job)
        except BaseException:
            self.stop()  # nothing of ours is left running when the start fails
            raise

    def get_job_status(self, job_id: str) -> Optional[str]:
        return self._sessions().get_job_status(job_id)

    def abort_job(self, job_id: str) -> None:
        self._sessions().abort_job(job_id)

    def get_job_result(self, job_id: str, timeout: float = 0.0) -> Optional[str]:
        return self._sessions().get_job_result(job_id, timeout)

    def stop(self, clean_up: bool = False, wait_s: float = 30.0) -> list[int]:
        """Shut down the system this environment started (nothing else), then end what is left of the processes it
        started, by their ids (SIGTERM, then SIGKILL). ``clean_up`` removes the workspace once nothing runs there.
        Returns the ids of the processes that had to be ended."""
        ended: list[int] = []
        if self._services:
            try:
                project, services = setup_service_config(self.poc_workspace)
                prod = get_prod_dir(self.poc_workspace, project.get("name"))
                shutdown_system(prod, username=services[SC.FLARE_PROJ_ADMIN], verbose=False)
            except Exception:  # the server may be gone already; what is left is ended below
                pass
            ended = self.tracker.end(wait_s) if self.tracker else []
            for proc in self._services.values():
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
            self._services, self.tracker = {}, None
        if clean_up:
            self.remove_workspace()
        return ended

    def remove_workspace(self) -> None:
        """Delete the workspace (logs included) unless a system runs there."""
        if os.path.isdir(self.poc_workspace) and not system_running(self.poc_workspace):
            shutil.rmtree(self.poc_workspace, ignore_errors=True)

    # ------------------------------------------------------------------------------------------------ the pieces
    def _provision(self) -> None:
        """NVFlare's POC provisioning of the workspace; without a project file, NVFlare's default project with our
        clients, HE choice and ports (the server named ``server``, as ``nvflare poc prepare`` names it)."""
        os.makedirs(self.poc_workspace, exist_ok=True)
        conf = self.project_conf_path
        if not conf:
            conf = os.path.join(self.poc_workspace, "project.yml")
            gen_default_project_config("dummy_project.yml", conf)
            project = update_server_name(load_yaml(conf))
            project = add_he_builder(self.use_he, update_clients(self.clients or [], self.num_clients, project))
            fl_port, admin_port = self.ports or free_ports(2)
            for p in project["participants"]:
                if p.get("type") == "server":
                    p["fed_learn_port"], p["admin_port"] = int(fl_port), int(admin_port)
            save_project_config(project, conf)
        # a workspace used before is provisioned afresh: NVFlare numbers a second kit prod_01, but starts prod_00 and
        # points only prod_00's server at the workspace's job storage
        shutil.rmtree(os.path.join(self.poc_workspace, load_yaml(conf)["name"]), ignore_errors=True)
        prepare_poc_provision(
            clients=self.clients or [],
            number_of_clients=self.num_clients,
            workspace=self.poc_workspace,
            docker_image=None,
            use_he=self.use_he,
            project_conf_path=conf,
            examples_dir=None,
        )

    def _start_services(self) -> None:
        """The server, then each site: its kit's ``sub_start.sh`` (NVFlare's supervisor loop) as our own child."""
        project, services = setup_service_config(self.poc_workspace)
        prod = get_prod_dir(self.poc_workspace, project.get("name"))
        clients = list(services[SC.FLARE_CLIENTS])
        gpus = client_gpu_assignments(clients, self.gpu_ids) if self.gpu_ids else {}
        path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
        self.tracker = ProcessTracker()
        for name in [services[SC.FLARE_SERVER], *clients]:
            env = dict(os.environ, PATH=path)
            if gpus.get(name):
                env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus[name])
            folder = os.path.join(prod, name)
            with open(os.path.join(folder, "poc_console.log"), "a") as log:
                proc = subprocess.Popen(
                    [os.path.join(folder, "startup", "sub_start.sh")],
                    cwd=folder,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # a Ctrl-C meant for the caller reaches the system through stop()
                )
            self._services[name] = proc
            self.tracker.add(proc.pid)

    def _sessions(self) -> SessionManager:
        return SessionManager(
            {
                "username": self.username,
                "startup_kit_location": admin_kit(self),
                "timeout": self.get_extra_prop("login_timeout", 10),
                "study": self.study,
            }
        )


def all_sites_poc_env(num_clients: int, connect_timeout: float = 300.0, **kwargs: Any) -> PrivatePocEnv:
    """A ``PrivatePocEnv`` for ``num_clients`` sites (a private workspace and free ports unless ``kwargs`` say)."""
    return PrivatePocEnv(num_clients=num_clients, connect_timeout=connect_timeout, **kwargs)


def stop_poc_system(env: Any, wait_s: float = 30.0) -> list[int]:
    """Stop a POC system ``run_job`` ran a job in, keeping its workspace and logs. A ``PrivatePocEnv`` ends what is
    left of its own processes (their ids are returned); NVFlare's ``PocEnv`` is stopped through its public ``stop``.
    """
    if isinstance(env, PrivatePocEnv):
        return env.stop(clean_up=False, wait_s=wait_s)
    try:
        env.stop(clean_up=False)
    except Exception:  # stopping is best effort
        pass
    return []
