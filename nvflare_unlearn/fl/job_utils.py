"""What a job needs around its components: code the sites must import, site authorization, quiet logs.

- ``model_files_to_ship``: the source files of a user's own model module that the job must carry to the server
  and every site (an installed module is referenced by name instead);
- ``package_bundle``: a clean copy of the whole plugin package, for jobs that carry it (``bundle_code=True``);
- ``authorize_site_config`` / ``authorize_poc_workspace``: allow ``nvflare_unlearn.fl`` in a site's
  ``class_allow_list`` (non-BYOC jobs);
- ``quiet_log_config``: a simulator log config that keeps NVFlare's console quiet;
- ``script_runner``: the user's own Client API script as the client component, with NUMPY exchange.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST
from nvflare.app_common.widgets.component_path_authorizer import CLASS_ALLOW_LIST

from nvflare_unlearn import _io

#: What a site's ``class_allow_list`` must contain to run these jobs without bundling code (non-BYOC).
ALLOW_LIST_ENTRY = "nvflare_unlearn.fl"


def model_files_to_ship(model_name: str) -> Optional[list[str]]:
    """Source files of an import-path model that the job must carry (None when the module is pip-installed).

    The server (persistor, controller) and every site import the factory. A module installed in site-packages is
    referenced by name; a module from the user's own folder is added to the job's ``custom`` code on both sides
    (FedJob ``to_server`` / ``to_clients``), with the ``__init__.py`` of every package above it.
    """
    import sys
    import sysconfig

    from nvflare_unlearn.models import is_import_path

    if not is_import_path(model_name):
        return None
    module_name = model_name.split(":", 1)[0]
    top = module_name.split(".", 1)[0]
    if top in ("nvflare", "nvflare_unlearn", "torch", "torchvision"):
        return None
    module = sys.modules.get(module_name)
    source = getattr(module, "__file__", None)
    if not source:
        return None
    source = os.path.realpath(source)
    installed = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    if any(part in ("site-packages", "dist-packages") for part in source.split(os.sep)) or any(
        source.startswith(os.path.realpath(p) + os.sep) for p in installed
    ):
        return None
    files = [source]
    parent = module_name.rsplit(".", 1)[0] if "." in module_name else None
    while parent:
        init = getattr(sys.modules.get(parent), "__file__", None)
        if init:
            files.append(os.path.realpath(init))
        parent = parent.rsplit(".", 1)[0] if "." in parent else None
    return files


_BUNDLE_IGNORE = ("__pycache__", "*.pyc", "*.pyo", "*.tmp*")
_bundle_dir: Optional[str] = None


def package_bundle() -> str:
    """A clean copy of the installed ``nvflare_unlearn`` package (every module, subpackage, ``__init__.py`` and data
    file; no bytecode caches), made once per process; returns the folder to copy into a job's ``custom/``.

    FedJob alone copies only the modules it sees imported by the components, which leaves a package that fails to
    import where it is not installed; a job that carries the plugin carries all of it.
    """
    import atexit
    import shutil
    import tempfile

    global _bundle_dir
    if _bundle_dir is None or not os.path.isdir(_bundle_dir):
        source = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the nvflare_unlearn package folder
        root = tempfile.mkdtemp(prefix="nvflare_unlearn_bundle_")
        atexit.register(shutil.rmtree, root, True)
        target = os.path.join(root, "nvflare_unlearn")
        shutil.copytree(source, target, ignore=shutil.ignore_patterns(*_BUNDLE_IGNORE))
        _bundle_dir = target
    return _bundle_dir


def authorize_site_config(local_dir: str) -> str:
    """Add ``nvflare_unlearn.fl`` to the ``class_allow_list`` of a site's ``local/`` folder; returns the file.

    Without it a non-BYOC job using these components fails with ComponentNotAuthorized ("... is not in
    allow_list"). Starts from NVFlare's default allow list when the site has none, so nothing else is loosened.
    """
    os.makedirs(local_dir, exist_ok=True)
    target = os.path.join(local_dir, "resources.json")
    if not os.path.exists(target):
        target = os.path.join(local_dir, "resources.json.default")
    resources: dict = {"format_version": 2}
    if os.path.exists(target):
        with open(target) as f:
            resources = json.load(f)
        if not isinstance(resources, dict):
            raise ValueError(f"{target} must hold a JSON object")
    allow = resources.get(CLASS_ALLOW_LIST)
    if allow is None:
        allow = list(DEFAULT_CLASS_ALLOW_LIST)
    if "*" not in allow and ALLOW_LIST_ENTRY not in allow:
        allow.append(ALLOW_LIST_ENTRY)
    resources[CLASS_ALLOW_LIST] = allow
    _io.write_json(target, resources, indent=4)
    return target


def authorize_poc_workspace(poc_workspace: str) -> list[str]:
    """Allow our components on every site of a prepared POC workspace (``<ws>/<project>/prod_NN/<site>/local``).

    For scripts that run ``nvflare poc prepare`` themselves, between ``prepare`` and ``start``. Returns the files.
    """
    done = []
    for project in sorted(os.listdir(poc_workspace)) if os.path.isdir(poc_workspace) else []:
        pdir = os.path.join(poc_workspace, project)
        for prod in sorted(os.listdir(pdir)) if os.path.isdir(pdir) else []:
            if not prod.startswith("prod_"):
                continue
            for site in sorted(os.listdir(os.path.join(pdir, prod))):
                sdir = os.path.join(pdir, prod, site)
                if os.path.isdir(os.path.join(sdir, "local")) and os.path.isdir(os.path.join(sdir, "startup")):
                    done.append(authorize_site_config(os.path.join(sdir, "local")))
    return done


def quiet_log_config(directory: str, console_level: str = "WARNING") -> str:
    """Write a simulator log config that prints only ``console_level`` and above to the console; returns its path.

    Pass it as ``SimEnv(log_config=...)``. The sites' ``log.txt`` files keep full INFO logs (``read_job_result``
    reads them to explain a failure); only NVFlare's console chatter goes.
    """
    import copy

    from nvflare.fuel.utils.log_utils import concise_log_dict

    config = copy.deepcopy(concise_log_dict)
    config["handlers"]["consoleHandler"]["level"] = console_level
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(os.path.abspath(directory), "quiet_log_config.json")
    if " " in path:
        raise ValueError(f"the simulator passes the log config on a command line: use a path without spaces ({path!r})")
    _io.write_json(path, config)
    return path


def script_runner(train_script: str, train_args: str = ""):
    """The user's Client API script (see ``client_api``) as the client component, run with NUMPY exchange.

    NUMPY on both ends: the PyTorch exchange reshapes received weights to the previous round's shapes, which a
    pruned model no longer has, and drops numpy arrays (the activation reports).
    """
    from nvflare.client.config import ExchangeFormat
    from nvflare.fuel.utils.constants import FrameworkType
    from nvflare.job_config.script_runner import ScriptRunner

    if not os.path.isfile(train_script):
        raise ValueError(f"train_script {train_script!r} does not exist")
    return ScriptRunner(
        script=train_script,
        script_args=train_args,
        framework=FrameworkType.NUMPY,
        server_expected_format=ExchangeFormat.NUMPY,
    )
