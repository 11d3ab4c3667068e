"""NVFlare 2.9 recipes: the surface users (and the ``nvflare-unlearn`` CLI) build jobs with.

- ``PretrainRecipe``: FedAvg on all classes; produces the checkpoint to unlearn from.
- ``UnlearningRecipe``: the federated unlearning job (activations -> TF-IDF -> pruning -> FedAvg fine-tune).
- ``RetrainRecipe``: FedAvg from scratch without the forget classes (the gold standard to compare against).

Each is a small ``Recipe`` around a ``FedJob``; run it with ``recipe.execute(SimEnv(...))`` / ``PocEnv`` /
``ProdEnv``, or export it with ``recipe.export(job_dir)``. Options come in the typed groups of
``nvflare_unlearn.options`` (``plan={"prune_ratio": 0.2}``) or flat (``prune_ratio=0.2``): the same names in the
recipes, the CLI flags, the exported JSON and the metrics record, each validated once, when the recipe is built.
Components are created by ``_create_persistor`` / ``_create_controller`` / ``_create_executor`` (override them to
swap one); client apps are prepared late, so ``set_per_site_config`` can change any site-side option per site.
Components are referenced by import path (``nvflare_unlearn`` installed on every site), so sites must allow
``nvflare_unlearn.fl`` in their ``class_allow_list``: the recipes do that for ``SimEnv``; ``PocEnv`` jobs bundle the
code; production site admins allow the package, or build the job with ``bundle_code=True``.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar, Optional, Sequence, Union

from nvflare.app_opt.tracking.tb.tb_receiver import TBAnalyticsReceiver
from nvflare.job_config.api import FedJob
from nvflare.recipe.spec import ExecEnv, Recipe

from nvflare_unlearn._validation import check_num_classes, normalize_forget_classes
from nvflare_unlearn.fl.aggregator import ActivationAggregator
from nvflare_unlearn.fl.defs import (
    FINAL_MODEL_FILE,
    GLOBAL_MODEL_FILE,
    TASK_ACTIVATIONS,
    TASK_TRAIN,
    TASK_VALIDATE,
    TASK_VERIFY,
)
from nvflare_unlearn.fl.executor import UnlearningExecutor
from nvflare_unlearn.fl.fedavg_eval_controller import FedAvgEvalController
from nvflare_unlearn.fl.job_utils import authorize_site_config, model_files_to_ship, script_runner
from nvflare_unlearn.fl.persistor import UnlearningModelPersistor, load_initial_model
from nvflare_unlearn.fl.unlearning_controller import UnlearningController
from nvflare_unlearn.models import model_spec
from nvflare_unlearn.options import (
    FederationOptions,
    MethodOptions,
    OptionGroup,
    PlanOptions,
    PrivacyOptions,
    ScoringOptions,
    SecurityOptions,
    SiteDataOptions,
    TrainingOptions,
    split_options,
)

__all__ = ["PretrainRecipe", "RetrainRecipe", "UnlearningRecipe"]

#: option groups the sites use: what ``set_per_site_config`` may set per site
SITE_GROUPS = (SiteDataOptions, TrainingOptions, ScoringOptions, PrivacyOptions)
_SCRIPT_KEYS = ("train_script", "train_args")


class _JobRecipe(Recipe):
    """Shared construction: one server workflow + persistor (+ TensorBoard receiver), one executor per site."""

    GROUPS: ClassVar[tuple[type[OptionGroup], ...]] = (
        SiteDataOptions,
        TrainingOptions,
        FederationOptions,
        SecurityOptions,
    )
    DEFAULTS: ClassVar[dict[str, Any]] = {}  # this job's defaults for option fields (e.g. a larger pretraining lr)
    JOB_KIND: ClassVar[str] = "train"
    OUTPUT_FILE: ClassVar[str] = GLOBAL_MODEL_FILE

    def __init__(
        self,
        *,
        name: str,
        model: Union[str, Any],
        num_classes: int,
        forget_classes: Optional[Union[int, Sequence[int]]],
        initial_ckpt: Optional[str],
        in_channels: Optional[int],
        input_shape: Optional[Sequence[int]],
        test_dataset: Optional[str],
        test_data_root: Optional[str],
        tensorboard: bool,
        bundle_code: bool,
        train_script: Optional[str],
        train_args: str,
        groups: dict[str, Any],
        options: dict[str, Any],
    ):
        where = type(self).__name__
        flat = {**{k: v for k, v in self.DEFAULTS.items() if not _given(k, options, groups)}, **options}
        parsed, rest = split_options(flat, self.GROUPS, where, given=groups)
        if rest:
            raise TypeError(f"{where}() got unexpected keyword argument(s) {sorted(rest)}")
        if "min_clients" not in options and not (groups.get("federation") or {}).get("min_clients"):
            parsed["federation"] = FederationOptions.from_dict(
                {**parsed["federation"].to_dict(), "min_clients": parsed["site_data"].num_clients}
            )  # default quorum: every site
        self.options: dict[str, OptionGroup] = parsed
        self.model_name = model_spec(model, input_shape)
        self.num_classes = check_num_classes(num_classes)
        self.forget_classes = normalize_forget_classes(forget_classes, self.num_classes, required=False)
        self.num_clients = parsed["site_data"].num_clients
        self.min_clients = parsed["federation"].min_clients
        if self.min_clients > self.num_clients:
            raise ValueError(f"min_clients={self.min_clients} exceeds num_clients={self.num_clients}")
        self.num_rounds = parsed["federation"].num_rounds
        self.initial_ckpt = initial_ckpt
        self.in_channels = in_channels
        self.test_dataset = test_dataset
        self.test_data_root = test_data_root
        self.bundle_code = bundle_code
        self.train_script = train_script
        self.train_args = train_args
        if train_script is not None and not os.path.isfile(train_script):
            raise ValueError(f"train_script {train_script!r} does not exist")
        self._per_site: dict[str, dict] = {}

        job = FedJob(name=name, min_clients=self.min_clients)
        if not bundle_code:
            job.set_app_packages(["nvflare_unlearn"])  # installed on every site: reference by import path
        persistor_id = job.to_server(self._create_persistor(), id="persistor")
        job.to_server(self._create_controller(persistor_id), id="controller")
        self._add_server_components(job)
        if tensorboard:
            job.to_server(TBAnalyticsReceiver(), id="tb_receiver")
        for source in model_files_to_ship(self.model_name) or []:  # the user's model module, when not installed
            job.to_server(source)
        super().__init__(job)

    # -- hooks (override to swap a component) ------------------------------------------------------------------
    def _create_persistor(self) -> UnlearningModelPersistor:
        return UnlearningModelPersistor(
            self.model_name,
            self.num_classes,
            initial_ckpt=self.initial_ckpt,
            output_file=self.OUTPUT_FILE,
            prune_mode=self._group("plan", PlanOptions).prune_mode,
            in_channels=self.in_channels,
            seed=self.options["training"].seed,
        )

    def _create_controller(self, persistor_id: str) -> FedAvgEvalController:
        return FedAvgEvalController(
            model_name=self.model_name,
            num_classes=self.num_classes,
            forget_classes=self.forget_classes,
            federation=self.options["federation"].to_dict(),
            in_channels=self.in_channels,
            test_dataset=self.test_dataset,
            test_data_root=self.test_data_root,
            persistor_id=persistor_id,
            job_kind=self.JOB_KIND,
            security=self._group("security", SecurityOptions).to_dict(),
        )

    def _create_executor(self, site_config: dict) -> Any:
        """The client component of one site (``site_config``: its ``set_per_site_config`` entry, maybe empty)."""
        script = site_config.get("train_script", self.train_script)
        if script is not None:
            return script_runner(script, site_config.get("train_args", self.train_args))
        groups, _ = split_options(
            {k: v for k, v in site_config.items() if k not in _SCRIPT_KEYS},
            SITE_GROUPS,
            f"{type(self).__name__} site config",
            given=self._site_groups(),
        )
        return UnlearningExecutor(
            self.model_name,
            self.num_classes,
            **{g: o.to_dict() for g, o in groups.items()},
            forget_classes=self.forget_classes or None,
            in_channels=self.in_channels,
        )

    def _add_server_components(self, job: FedJob) -> None:
        """Extra server components (the unlearning job adds its activation aggregator)."""

    # -- NVFlare recipe protocol -------------------------------------------------------------------------------
    def _apply_per_site_config(self, config: dict[str, dict]) -> None:
        """Per-site values of any site-side option (``data_root``, ``lr``, ``min_count``...) or script; checked now."""
        allowed = {n for g in SITE_GROUPS for n in g.names()} | set(_SCRIPT_KEYS)
        for site, cfg in config.items():
            unknown = sorted(set(cfg) - allowed)
            if unknown:
                raise ValueError(
                    f"per-site config for {site!r}: unknown option(s) {unknown}; per-site options are {sorted(allowed)}"
                )
            self._create_executor(cfg)  # validates the values
        self._per_site = config

    def _prepare_client_apps(self) -> None:
        tasks = [TASK_ACTIVATIONS, TASK_TRAIN, TASK_VALIDATE, TASK_VERIFY]
        sources = model_files_to_ship(self.model_name) or []
        if not self._per_site:
            self._job.to_clients(self._create_executor({}), tasks=tasks)
            for source in sources:
                self._job.to_clients(source)
            return
        for site, cfg in self._per_site.items():
            self._job.to(self._create_executor(cfg), site, tasks=tasks)
            for source in sources:
                self._job.to(source, site)

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

    # -- helpers -----------------------------------------------------------------------------------------------
    def _group(self, name: str, kind: type[OptionGroup]) -> Any:
        return self.options.get(name) or kind()

    def _site_groups(self) -> dict[str, Any]:
        return {g.GROUP: self._group(g.GROUP, g) for g in SITE_GROUPS}


def _given(name: str, options: dict, groups: dict) -> bool:
    return name in options or any(
        name in (g.to_dict() if isinstance(g, OptionGroup) else (g or {})) for g in groups.values()
    )


class PretrainRecipe(_JobRecipe):
    """FedAvg on all classes with the plugin's executor; writes ``global_model.pt`` (weights + empty plan) and
    ``unlearning_metrics.json`` (per-round accuracy) into the server's run directory. Pass the model file as
    ``initial_ckpt`` of an ``UnlearningRecipe``.

    Options (flat or as groups, see ``nvflare_unlearn.options``): ``site_data`` (dataset, data_root, partition,
    num_clients, ...), ``training`` (local_epochs, lr, batch_size, seed, ...), ``federation`` (num_rounds,
    min_clients, task_timeout, stop_cond, ...), ``security`` (declared site sizes, robust update aggregation,
    the record's signing key). Defaults here: ``lr=0.05``, ``num_rounds=5``.
    """

    DEFAULTS: ClassVar[dict[str, Any]] = {"lr": 0.05, "num_rounds": 5}
    JOB_KIND: ClassVar[str] = "pretrain"

    def __init__(
        self,
        *,
        name: str = "pretrain",
        model: Union[str, Any] = "small_cnn",
        num_classes: int = 10,
        initial_ckpt: Optional[str] = None,
        forget_classes: Optional[Sequence[int]] = None,
        in_channels: Optional[int] = None,
        input_shape: Optional[Sequence[int]] = None,
        test_dataset: Optional[str] = None,
        test_data_root: Optional[str] = None,
        tensorboard: bool = True,
        bundle_code: bool = False,
        train_script: Optional[str] = None,
        train_args: str = "",
        site_data: Optional[dict] = None,
        training: Optional[dict] = None,
        federation: Optional[dict] = None,
        security: Optional[dict] = None,
        **options: Any,
    ):
        if initial_ckpt is not None and not os.path.isfile(initial_ckpt):
            raise ValueError(f"initial_ckpt {initial_ckpt!r} does not exist")
        super().__init__(
            name=name,
            model=model,
            num_classes=num_classes,
            forget_classes=forget_classes,
            initial_ckpt=os.path.abspath(initial_ckpt) if initial_ckpt else None,
            in_channels=in_channels,
            input_shape=input_shape,
            test_dataset=test_dataset,
            test_data_root=test_data_root,
            tensorboard=tensorboard,
            bundle_code=bundle_code,
            train_script=train_script,
            train_args=train_args,
            groups=dict(site_data=site_data, training=training, federation=federation, security=security),
            options=options,
        )


class RetrainRecipe(PretrainRecipe):
    """FedAvg from scratch on the retained classes only (sites drop ``forget_classes``): the gold standard an
    unlearned model is compared with. Reports U/R accuracy per round like the unlearning job."""

    JOB_KIND: ClassVar[str] = "retrain"

    def __init__(self, *, name: str = "retrain", forget_classes: Sequence[int], num_classes: int = 10, **kwargs):
        normalize_forget_classes(forget_classes, num_classes)
        if kwargs.get("initial_ckpt") is not None:
            raise ValueError("retraining starts from scratch: do not pass initial_ckpt")
        super().__init__(name=name, num_classes=num_classes, forget_classes=forget_classes, **kwargs)


class UnlearningRecipe(_JobRecipe):
    """Federated class unlearning of a trained model (Wang et al., WWW 2022), end to end in one job.

    Outputs in the server's run directory: ``pruned_model.pt`` (after pruning), ``pruning_plan.json``,
    ``unlearned_model.pt`` (after fine-tuning; weights + plan), ``unlearning_metrics.json`` and the audit record
    ``unlearning_record.json``.

    Args:
        model / num_classes / in_channels / input_shape: the trained model's architecture: a registry name, your
            own model as an import path ``"package.module:factory"``, or the factory itself (``models.model_spec``).
        initial_ckpt: the trained model (our checkpoint, a state_dict .pt, or NVFlare's FL_global_model.pt), as a
            path on this machine (checked here) or, with ``check_ckpt=False``, an absolute path as seen by the
            server. Never modified.
        forget_classes: class id(s) to forget; one statistics + pruning pass per class.
        unlearning / scoring / plan / privacy / site_data / training / federation / security: the option groups
            (``nvflare_unlearn.options``), as dicts or group objects; any field may also be given flat
            (``method="neggrad"``, ``recovery="kd"``, ``prune_ratio=0.2``). Defaults here: ``num_rounds=3``,
            ``lr=0.01``; ``method="prune"`` (the paper).
        test_dataset / test_data_root: optional server-side test set evaluated centrally at every stage.
        tensorboard: add NVFlare's TensorBoard receiver (U/R accuracy by round under the run's tb_events/).
        bundle_code: copy the plugin's code into the job (BYOC) instead of referencing the installed package.
        train_script / train_args: run your own Client API script on the sites instead of the plugin's executor
            (it must answer the three tasks, see ``nvflare_unlearn.fl.client_api``); the site_data options are
            then unused, the script loads its own data.
    """

    GROUPS: ClassVar[tuple[type[OptionGroup], ...]] = (
        MethodOptions,
        ScoringOptions,
        PlanOptions,
        PrivacyOptions,
        SiteDataOptions,
        TrainingOptions,
        FederationOptions,
        SecurityOptions,
    )
    JOB_KIND: ClassVar[str] = "unlearn"
    OUTPUT_FILE: ClassVar[str] = FINAL_MODEL_FILE

    def __init__(
        self,
        *,
        name: str = "unlearn",
        model: Union[str, Any] = "small_cnn",
        num_classes: int = 10,
        initial_ckpt: str,
        forget_classes: Union[int, Sequence[int]],
        in_channels: Optional[int] = None,
        input_shape: Optional[Sequence[int]] = None,
        test_dataset: Optional[str] = None,
        test_data_root: Optional[str] = None,
        tensorboard: bool = True,
        bundle_code: bool = False,
        train_script: Optional[str] = None,
        train_args: str = "",
        check_ckpt: bool = True,
        unlearning: Optional[dict] = None,
        scoring: Optional[dict] = None,
        plan: Optional[dict] = None,
        privacy: Optional[dict] = None,
        site_data: Optional[dict] = None,
        training: Optional[dict] = None,
        federation: Optional[dict] = None,
        security: Optional[dict] = None,
        **options: Any,
    ):
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
        normalize_forget_classes(forget_classes, num_classes)
        super().__init__(
            name=name,
            model=model,
            num_classes=num_classes,
            forget_classes=forget_classes,
            initial_ckpt=os.path.abspath(initial_ckpt),
            in_channels=in_channels,
            input_shape=input_shape,
            test_dataset=test_dataset,
            test_data_root=test_data_root,
            tensorboard=tensorboard,
            bundle_code=bundle_code,
            train_script=train_script,
            train_args=train_args,
            groups=dict(
                unlearning=unlearning,
                scoring=scoring,
                plan=plan,
                privacy=privacy,
                site_data=site_data,
                training=training,
                federation=federation,
                security=security,
            ),
            options=options,
        )
        self.prune_ratio = self.options["plan"].prune_ratio
        if check_ckpt:  # corrupt file or wrong architecture: say so now, not from inside the server's run
            load_initial_model(
                self.initial_ckpt, self.model_name, self.num_classes, self.in_channels, self.options["plan"].prune_mode
            )

    def _create_controller(self, persistor_id: str) -> UnlearningController:
        o = self.options
        return UnlearningController(
            model_name=self.model_name,
            num_classes=self.num_classes,
            forget_classes=self.forget_classes,
            unlearning=o["unlearning"].to_dict(),
            scoring=o["scoring"].to_dict(),
            plan=o["plan"].to_dict(),
            privacy=o["privacy"].to_dict(),
            federation=o["federation"].to_dict(),
            in_channels=self.in_channels,
            test_dataset=self.test_dataset,
            test_data_root=self.test_data_root,
            persistor_id=persistor_id,
            aggregator_id="activation_aggregator",
            security=o["security"].to_dict(),
        )

    def _add_server_components(self, job: FedJob) -> None:
        scoring, privacy, security = self.options["scoring"], self.options["privacy"], self.options["security"]
        job.to_server(
            ActivationAggregator(
                self.num_classes,
                aggregation=scoring.aggregation,
                trim=scoring.trim,
                clip_bound=privacy.clip_bound,
                site_sizes=security.site_sizes,
                size_cap_factor=security.size_cap_factor,
            ),
            id="activation_aggregator",
        )
