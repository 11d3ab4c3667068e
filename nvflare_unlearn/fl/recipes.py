"""NVFlare 2.9 recipes: the surface users (and the ``nvflare-unlearn`` CLI) build jobs with.

- ``PretrainRecipe``: FedAvg on all classes; produces the checkpoint to unlearn from.
- ``UnlearningRecipe``: the federated unlearning job (activations -> TF-IDF -> pruning -> FedAvg fine-tune).
- ``RetrainRecipe``: FedAvg from scratch without the forget classes (the gold standard to compare against).

Each is a small ``Recipe`` around a ``FedJob``; run it with ``recipe.execute(SimEnv(...))`` / ``PocEnv`` /
``ProdEnv``, or export it with ``recipe.export(job_dir)`` (``python job.py --export``). Components are referenced
by import path (``nvflare_unlearn`` is pip-installed on every site), so sites must allow ``nvflare_unlearn.fl`` in
their ``class_allow_list``: the recipes do that for ``SimEnv`` and ``PocEnv`` workspaces; production site admins
add it themselves, or build the job with ``bundle_code=True`` (a BYOC job). Read a finished job's outputs with
``read_job_result(run.get_result())``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Optional, Sequence, Union

from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST
from nvflare.app_common.widgets.component_path_authorizer import CLASS_ALLOW_LIST
from nvflare.app_opt.tracking.tb.tb_receiver import TBAnalyticsReceiver
from nvflare.job_config.api import FedJob
from nvflare.recipe.spec import ExecEnv, Recipe

from .aggregator import ActivationAggregator
from .controller import FedAvgEvalController, UnlearningController
from .defs import GLOBAL_MODEL_FILE, FINAL_MODEL_FILE, PRUNE_MODES, TASK_ACTIVATIONS, TASK_TRAIN, TASK_VALIDATE
from .executor import UnlearningExecutor
from .persistor import UnlearnModelPersistor, load_initial_model
from .results import JobResult, read_job_result
from .site_data import check_data_spec

#: What a site's ``class_allow_list`` must contain to run these jobs without bundling code (non-BYOC).
ALLOW_LIST_ENTRY = "nvflare_unlearn.fl"

__all__ = [
    "ALLOW_LIST_ENTRY",
    "PretrainRecipe",
    "RetrainRecipe",
    "UnlearningRecipe",
    "JobResult",
    "read_job_result",
    "authorize_site_config",
    "quiet_log_config",
    "resolve_model_name",
]


# ---------------------------------------------------------------------------------------------- validation
def resolve_model_name(model: Union[str, Any, Callable[..., Any]], input_shape: Optional[Sequence[int]] = None) -> str:
    """The string every machine rebuilds the model from: a registry name, or your own model's import path.

    ``model`` may be a registry name (``"small_cnn"``), an import path ``"package.module:factory"`` (a callable
    ``factory(num_classes=K) -> nn.Module`` importable on the server and every site), the factory itself (a
    module-level function or nn.Module class; lambdas and local functions are refused), or a module built by
    ``build_model``. ``input_shape=(C, H, W)`` gives the input size of an import-path model whose factory does not
    carry an ``input_shape`` attribute; it is written into the name (``"package.module:factory@CxHxW"``), so the
    exported job holds strings only. An arbitrary ``nn.Module`` instance is refused: the sites could not rebuild it.
    """
    from torch import nn

    from ..models import MODEL_NAMES, model_name_of, model_spec

    if isinstance(model, nn.Module):
        name = model_name_of(model)
        if name is None:
            raise ValueError(
                f"{type(model).__name__} was not built by nvflare_unlearn.build_model: every site must rebuild the "
                f"same architecture from a name; give a registry name ({', '.join(MODEL_NAMES)}) or your model's "
                "factory as an import path 'package.module:factory'"
            )
        return model_spec(name, input_shape)
    return model_spec(model, input_shape)


def _module_file_to_ship(model_name: str) -> Optional[list[str]]:
    """Source files of an import-path model that the job must carry (None when the module is pip-installed).

    The server (persistor, controller) and every site import the factory. A module installed in site-packages is
    referenced by name; a module from the user's own folder is added to the job's ``custom`` code on both sides
    (FedJob ``to_server`` / ``to_clients``), with the ``__init__.py`` of every package above it.
    """
    import sys
    import sysconfig

    from ..models import is_import_path

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


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_forget(forget_classes: Any, num_classes: int, required: bool) -> list[int]:
    if forget_classes is None:
        forget_classes = []
    if isinstance(forget_classes, int) and not isinstance(forget_classes, bool):
        forget_classes = [forget_classes]
    out = []
    for c in forget_classes:
        if isinstance(c, bool) or not isinstance(c, int):
            raise ValueError(f"forget class ids must be integers, got {c!r}")
        if not 0 <= c < num_classes:
            raise ValueError(f"forget class {c} is not a class of this model: valid ids are 0..{num_classes - 1}")
        if c in out:
            raise ValueError(f"forget class {c} is listed twice")
        out.append(c)
    if required and not out:
        raise ValueError("forget_classes must name at least one class to forget")
    if len(out) >= num_classes:
        raise ValueError(f"cannot forget all {num_classes} classes: at least one class must be retained")
    return out


def _check_lr(lr: Any) -> float:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    return float(lr)


# ---------------------------------------------------------------------------------------------- authorization
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
    with open(target, "w") as f:
        json.dump(resources, f, indent=4)
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
    with open(path, "w") as f:
        json.dump(config, f, indent=2)
    return path


# ---------------------------------------------------------------------------------------------- recipes
class _UnlearnBaseRecipe(Recipe):
    """Shared construction: one server workflow + persistor (+ TensorBoard receiver), one executor on all sites."""

    def __init__(
        self,
        *,
        name: str,
        model: Union[str, Any],
        num_classes: int,
        n_clients: int,
        min_clients: Optional[int],
        controller_factory: Callable[[str, int], Any],
        persistor: UnlearnModelPersistor,
        executor: UnlearningExecutor,
        tensorboard: bool,
        bundle_code: bool,
        train_script: Optional[str] = None,
        train_args: str = "",
    ):
        job = FedJob(name=name, min_clients=min_clients)
        if not bundle_code:
            job.set_app_packages(["nvflare_unlearn"])  # installed on every site: reference by import path
        persistor_id = job.to_server(persistor, id="persistor")
        job.to_server(controller_factory(persistor_id), id="controller")
        if tensorboard:
            job.to_server(TBAnalyticsReceiver(), id="tb_receiver")
        tasks = [TASK_ACTIVATIONS, TASK_TRAIN, TASK_VALIDATE]
        job.to_clients(_client_component(executor, train_script, train_args), tasks=tasks)
        self.model_name = resolve_model_name(model)
        for source in _module_file_to_ship(self.model_name) or []:  # the user's model module, when not installed
            job.to_server(source)
            job.to_clients(source)
        self.num_classes = num_classes
        self.n_clients = n_clients
        self.min_clients = min_clients
        self.bundle_code = bundle_code
        super().__init__(job)

    def process_env(self, env: ExecEnv):
        """Make the components loadable where the recipe can arrange it.

        SimEnv: allow ``nvflare_unlearn.fl`` in the simulator workspace. PocEnv provisions a fresh POC system inside
        ``deploy`` (after this hook), so an allow list written now would be lost: the job bundles the plugin's code
        instead (BYOC; the POC admin may submit it). ProdEnv: unchanged (site admins allow the package, or build
        the recipe with ``bundle_code=True``).
        """
        if self.bundle_code:
            return
        from nvflare.recipe.poc_env import PocEnv
        from nvflare.recipe.sim_env import SimEnv

        if isinstance(env, SimEnv):
            authorize_site_config(os.path.join(env.workspace_root, self.name, "local"))
        elif isinstance(env, PocEnv):
            self._job.set_app_packages([])
            self.bundle_code = True


def _client_component(executor: UnlearningExecutor, train_script: Optional[str], train_args: str):
    """The plugin's executor, or the user's Client API script (see ``client_api``) run with NUMPY exchange.

    NUMPY on both ends: the PyTorch exchange reshapes received weights to the previous round's shapes, which a
    pruned model no longer has, and drops numpy arrays (the activation reports).
    """
    if train_script is None:
        return executor
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


def _common_checks(model, num_classes, n_clients, min_clients, num_rounds, local_epochs, lr, dataset, partition,
                   alpha, q, batch_size) -> tuple[str, int]:  # fmt: skip
    name = resolve_model_name(model)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    _check_int("n_clients", n_clients, 1)
    min_clients = n_clients if min_clients is None else _check_int("min_clients", min_clients, 1)
    if min_clients > n_clients:
        raise ValueError(f"min_clients={min_clients} exceeds n_clients={n_clients}")
    _check_int("num_rounds", num_rounds, 0)
    _check_int("local_epochs", local_epochs, 0)
    _check_int("batch_size", batch_size, 1)
    _check_lr(lr)
    check_data_spec(dataset, partition, n_clients, alpha, q)
    return name, min_clients


class PretrainRecipe(_UnlearnBaseRecipe):
    """FedAvg on all classes with the plugin's executor; writes ``global_model.pt`` (weights + empty plan) and
    ``unlearning_metrics.json`` (per-round accuracy) into the server's run directory. Pass the model file as
    ``initial_ckpt`` of an ``UnlearningRecipe``."""

    def __init__(
        self,
        *,
        name: str = "pretrain",
        model: Union[str, Any] = "small_cnn",
        num_classes: int = 10,
        n_clients: int = 2,
        min_clients: Optional[int] = None,
        num_rounds: int = 5,
        local_epochs: int = 1,
        lr: float = 0.05,
        batch_size: int = 32,
        dataset: str = "digits",
        data_root: Optional[str] = None,
        partition: str = "iid",
        alpha: float = 0.5,
        q: float = 0.5,
        data_seed: int = 0,
        train_subset: Optional[int] = None,
        initial_ckpt: Optional[str] = None,
        forget_classes: Optional[Sequence[int]] = None,
        test_dataset: Optional[str] = None,
        test_data_root: Optional[str] = None,
        in_channels: Optional[int] = None,
        input_shape: Optional[Sequence[int]] = None,
        seed: int = 0,
        output_file: str = GLOBAL_MODEL_FILE,
        tensorboard: bool = True,
        bundle_code: bool = False,
        train_script: Optional[str] = None,
        train_args: str = "",
        _job_kind: str = "pretrain",
    ):
        model = resolve_model_name(model, input_shape)
        model_name, min_clients = _common_checks(
            model, num_classes, n_clients, min_clients, num_rounds, local_epochs, lr, dataset, partition, alpha, q,
            batch_size,
        )  # fmt: skip
        forget = _check_forget(forget_classes, num_classes, required=False)
        if initial_ckpt is not None and not os.path.isfile(initial_ckpt):
            raise ValueError(f"initial_ckpt {initial_ckpt!r} does not exist")
        initial_ckpt = os.path.abspath(initial_ckpt) if initial_ckpt else None
        self.num_rounds = num_rounds
        self.forget_classes = forget
        self.initial_ckpt = initial_ckpt

        def controller(persistor_id: str):
            return FedAvgEvalController(
                model_name=model_name, num_classes=num_classes, num_rounds=num_rounds, forget_classes=forget or None,
                min_clients=min_clients, in_channels=in_channels, test_dataset=test_dataset,
                test_data_root=test_data_root, persistor_id=persistor_id, job_kind=_job_kind,
            )  # fmt: skip

        super().__init__(
            name=name,
            model=model_name,
            num_classes=num_classes,
            n_clients=n_clients,
            min_clients=min_clients,
            controller_factory=controller,
            persistor=UnlearnModelPersistor(
                model_name, num_classes, initial_ckpt=initial_ckpt, output_file=output_file, in_channels=in_channels,
                seed=seed,
            ),  # fmt: skip
            executor=UnlearningExecutor(
                model_name, num_classes, dataset=dataset, data_root=data_root, partition=partition, n_sites=n_clients,
                alpha=alpha, q=q, data_seed=data_seed, train_subset=train_subset, batch_size=batch_size,
                local_epochs=local_epochs, lr=lr, forget_classes=forget or None, in_channels=in_channels, seed=seed,
            ),  # fmt: skip
            tensorboard=tensorboard,
            bundle_code=bundle_code,
            train_script=train_script,
            train_args=train_args,
        )


class RetrainRecipe(PretrainRecipe):
    """FedAvg from scratch on the retained classes only (sites drop ``forget_classes``): the gold standard an
    unlearned model is compared with. Reports U/R accuracy per round like the unlearning job."""

    def __init__(self, *, name: str = "retrain", forget_classes: Sequence[int], num_classes: int = 10, **kwargs):
        _check_forget(forget_classes, num_classes, required=True)
        if kwargs.get("initial_ckpt") is not None:
            raise ValueError("retraining starts from scratch: do not pass initial_ckpt")
        super().__init__(name=name, num_classes=num_classes, forget_classes=forget_classes, _job_kind="retrain",
                         **kwargs)  # fmt: skip


class UnlearningRecipe(_UnlearnBaseRecipe):
    """Federated class unlearning of a trained model (Wang et al., WWW 2022), end to end in one job.

    Outputs in the server's run directory: ``pruned_model.pt`` (after pruning), ``pruning_plan.json``,
    ``unlearned_model.pt`` (after fine-tuning; weights + plan) and ``unlearning_metrics.json``.
    """

    def __init__(
        self,
        *,
        name: str = "unlearn",
        model: Union[str, Any] = "small_cnn",
        num_classes: int = 10,
        initial_ckpt: str,
        forget_classes: Union[int, Sequence[int]],
        prune_ratio: float = 0.1,
        num_rounds: int = 3,
        local_epochs: int = 1,
        lr: float = 0.01,
        batch_size: int = 32,
        n_clients: int = 2,
        min_clients: Optional[int] = None,
        dataset: str = "digits",
        data_root: Optional[str] = None,
        partition: str = "iid",
        alpha: float = 0.5,
        q: float = 0.5,
        data_seed: int = 0,
        train_subset: Optional[int] = None,
        scope: str = "global",
        direction: str = "highest",
        idf: str = "paper",
        tf_norm: str = "share",
        coe: Optional[float] = None,
        min_channels: int = 1,
        prune_mode: str = "remove",
        hook_point: str = "conv",
        max_activation_batches: Optional[int] = None,
        min_count: int = 0,
        target_r_acc: Optional[float] = None,
        aggregation: str = "mean",
        trim: float = 0.1,
        clip_bound: Optional[float] = None,
        dp_epsilon: Optional[float] = None,
        dp_delta: Optional[float] = None,
        test_dataset: Optional[str] = None,
        test_data_root: Optional[str] = None,
        task_timeout: int = 0,
        wait_time_after_min_received: int = 10,
        in_channels: Optional[int] = None,
        input_shape: Optional[Sequence[int]] = None,
        seed: int = 0,
        tensorboard: bool = True,
        bundle_code: bool = False,
        train_script: Optional[str] = None,
        check_ckpt: bool = True,
        train_args: str = "",
    ):
        """
        Args:
            model / num_classes / in_channels: architecture of the trained model: a registry name, or your own model
                as an import path ``"package.module:factory"`` (or the factory function itself), see
                ``resolve_model_name`` and docs/integration.md.
            input_shape: (C, H, W) of an import-path model whose factory has no ``input_shape`` attribute.
            initial_ckpt: the trained model (our checkpoint, a state_dict .pt, or NVFlare's FL_global_model.pt);
                an absolute path as seen by the server. Never modified.
            forget_classes: class id(s) to forget; one statistics + pruning pass per class.
            prune_ratio: fraction of all conv channels pruned per class, in (0, 1).
            num_rounds: FedAvg fine-tuning rounds on the retained classes (0 = prune only).
            local_epochs / lr / batch_size: local SGD per fine-tuning round.
            n_clients / min_clients: federation size (data slices) and the fewest sites a task needs.
            dataset / data_root / partition / alpha / q / data_seed / train_subset: how each site finds its data
                (``data_root`` may contain ``{site_name}`` for per-site folders with ``partition="none"``).
            scope / direction / idf / tf_norm / coe / min_channels: TF-IDF and plan options (paper defaults).
            prune_mode: "remove" (physical removal, smaller model) or "mask" (shapes kept, channels held at zero).
            hook_point: "conv" (raw conv output, the paper) or "bn" (after BatchNorm).
            max_activation_batches: cap on each site's activation pass (None = all local training data).
            min_count: sites do not report a class they hold fewer images of (privacy; see ``privacy.py``).
            target_r_acc: stop fine-tuning early once federated retained-class accuracy reaches it (0..1).
            aggregation / trim: activation-report aggregation ("mean" exact, "median", "trimmed_mean").
            clip_bound: sites clip each image's pooled activation to [0, B] before summing; the server rejects a
                report whose sums exceed B * count.
            dp_epsilon / dp_delta: Gaussian noise on the sites' per-class sums, (epsilon, delta)-DP for the whole
                request per added/removed image (split evenly over the activation passes, one per forget class);
                needs ``clip_bound``. The server then accepts noisy reports and clamps class means at 0. A plan
                built on noisy reports is NOT reproducible on resubmission (fresh noise each time, by design).
            test_dataset / test_data_root: optional server-side test set evaluated centrally at every stage.
            task_timeout: seconds a site may take per task (0 = no limit); a site past it is left out of that task.
            wait_time_after_min_received: seconds to wait for the other sites once ``min_clients`` results are in.
            tensorboard: add NVFlare's TensorBoard receiver (U/R accuracy by round under the run's tb_events/).
            bundle_code: copy the plugin's code into the job (BYOC) instead of referencing the installed package.
            check_ckpt: check here that ``initial_ckpt`` exists (default). Set False when exporting a job whose
                checkpoint lives on the server machine (ProdEnv, job folders); the server's persistor checks then.
            train_script / train_args: run your own Client API script on the sites instead of the plugin's executor
                (it must answer the three tasks, see ``nvflare_unlearn.fl.client_api``); the data options are then
                unused, the script loads its own data.
        """
        model = resolve_model_name(model, input_shape)
        model_name, min_clients = _common_checks(
            model, num_classes, n_clients, min_clients, num_rounds, local_epochs, lr, dataset, partition, alpha, q,
            batch_size,
        )  # fmt: skip
        forget = _check_forget(forget_classes, num_classes, required=True)
        if isinstance(prune_ratio, bool) or not isinstance(prune_ratio, (int, float)) or not 0 < prune_ratio < 1:
            raise ValueError(f"prune_ratio must be a fraction in (0, 1), got {prune_ratio!r}")
        if prune_mode not in PRUNE_MODES:
            raise ValueError(f"prune_mode must be one of {list(PRUNE_MODES)}, got {prune_mode!r}")
        if target_r_acc is not None and not (isinstance(target_r_acc, (int, float)) and 0 < target_r_acc <= 1):
            raise ValueError(f"target_r_acc is a fraction in (0, 1], got {target_r_acc!r}")
        if not initial_ckpt or not isinstance(initial_ckpt, str):
            raise ValueError("initial_ckpt must name the trained model's checkpoint file")
        if check_ckpt and not os.path.isfile(initial_ckpt):
            raise ValueError(
                f"initial_ckpt {initial_ckpt!r} does not exist: give the trained model's checkpoint "
                "(e.g. the global_model.pt a PretrainRecipe run wrote); for a job exported to run on another "
                "machine pass check_ckpt=False and an absolute path as seen by the server"
            )
        if not check_ckpt and not os.path.isabs(initial_ckpt):
            raise ValueError(f"initial_ckpt {initial_ckpt!r} must be an absolute path as seen by the server")
        _check_plan_options(scope, direction, idf, tf_norm, coe, hook_point, min_channels)
        initial_ckpt = os.path.abspath(initial_ckpt)
        if check_ckpt:  # corrupt file or wrong architecture: say so now, not from inside the server's run
            load_initial_model(initial_ckpt, model_name, num_classes, in_channels, prune_mode)
        self.initial_ckpt = initial_ckpt
        self.forget_classes = forget
        self.prune_ratio = float(prune_ratio)
        self.num_rounds = num_rounds

        from .executor import check_dp_options

        check_dp_options(clip_bound, dp_epsilon, dp_delta)
        _check_int("task_timeout", task_timeout, 0)
        _check_int("wait_time_after_min_received", wait_time_after_min_received, 0)
        pass_epsilon = pass_delta = None
        if dp_epsilon is not None:  # one Gaussian release per activation pass; basic composition over the passes
            from ..privacy import split_budget

            pass_epsilon, pass_delta = split_budget(float(dp_epsilon), float(dp_delta), len(forget))
        self.dp_epsilon, self.dp_delta, self.clip_bound = dp_epsilon, dp_delta, clip_bound
        aggregator = ActivationAggregator(
            num_classes, method=aggregation, trim=trim, clip_bound=clip_bound, allow_negative=dp_epsilon is not None
        )

        def controller(persistor_id: str):
            return UnlearningController(
                model_name=model_name, num_classes=num_classes, forget_classes=forget, prune_ratio=float(prune_ratio),
                num_rounds=num_rounds, scope=scope, direction=direction, idf=idf, tf_norm=tf_norm, coe=coe,
                min_channels=min_channels, prune_mode=prune_mode, hook_point=hook_point, min_clients=min_clients,
                target_r_acc=target_r_acc, aggregator=aggregator, in_channels=in_channels, test_dataset=test_dataset,
                test_data_root=test_data_root, task_timeout=task_timeout,
                wait_time_after_min_received=wait_time_after_min_received, persistor_id=persistor_id,
                min_count=min_count, clip_bound=clip_bound, dp_epsilon=dp_epsilon, dp_delta=dp_delta,
            )  # fmt: skip

        super().__init__(
            name=name,
            model=model_name,
            num_classes=num_classes,
            n_clients=n_clients,
            min_clients=min_clients,
            controller_factory=controller,
            persistor=UnlearnModelPersistor(
                model_name, num_classes, initial_ckpt=initial_ckpt, output_file=FINAL_MODEL_FILE,
                prune_mode=prune_mode, in_channels=in_channels, seed=seed,
            ),  # fmt: skip
            executor=UnlearningExecutor(
                model_name, num_classes, dataset=dataset, data_root=data_root, partition=partition, n_sites=n_clients,
                alpha=alpha, q=q, data_seed=data_seed, train_subset=train_subset, batch_size=batch_size,
                local_epochs=local_epochs, lr=lr, hook_point=hook_point, max_activation_batches=max_activation_batches,
                min_count=min_count, clip_bound=clip_bound, dp_epsilon=pass_epsilon, dp_delta=pass_delta,
                in_channels=in_channels, seed=seed,
            ),  # fmt: skip
            tensorboard=tensorboard,
            bundle_code=bundle_code,
            train_script=train_script,
            train_args=train_args,
        )


def _check_plan_options(scope, direction, idf, tf_norm, coe, hook_point, min_channels) -> None:
    """The core's option names, checked here so a typo fails when the recipe is built, not mid-job on the server."""
    from ..activations import HOOK_POINTS
    from ..plan import DIRECTIONS, SCOPES
    from ..tfidf import IDF_VARIANTS, TF_NORMS

    for label, value, choices in (
        ("scope", scope, SCOPES),
        ("direction", direction, DIRECTIONS),
        ("idf", idf, IDF_VARIANTS),
        ("tf_norm", tf_norm, TF_NORMS),
        ("hook_point", hook_point, HOOK_POINTS),
    ):
        if value not in choices:
            raise ValueError(f"{label} must be one of {list(choices)}, got {value!r}")
    if tf_norm == "balance" and (coe is None or not coe > 0):
        raise ValueError("tf_norm='balance' needs a positive coe")
    if tf_norm != "balance" and coe is not None:
        raise ValueError("coe is only used with tf_norm='balance'")
    _check_int("min_channels", min_channels, 1)
