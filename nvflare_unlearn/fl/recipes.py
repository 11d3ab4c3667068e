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
code; production site admins allow the package, or build the job with ``bundle_code=True`` (the whole package travels
in the job's ``custom/`` folders).

Checkpoints follow NVFlare 2.9's recipes (``nvflare.recipe.utils.prepare_initial_ckpt``): a relative ``initial_ckpt``
(or ``resume_from``) is a file here that the job carries in the server app; an absolute one is a path on the server.
Quorum and task timeouts are per phase (``FederationOptions``): by default every site but one must answer, so one dead
site slows a job down by at most ``wait_time_after_min_received`` per task instead of stopping it.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar, Optional, Sequence, Union

from nvflare.apis.analytix import ANALYTIC_EVENT_TYPE
from nvflare.apis.job_def import ALL_SITES
from nvflare.app_common.widgets.convert_to_fed_event import ConvertToFedEvent
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
from nvflare_unlearn.fl.job_record import resume_problem
from nvflare_unlearn.fl.job_utils import authorize_site_config, model_files_to_ship, package_bundle, script_runner
from nvflare_unlearn.fl.persistor import UnlearningModelPersistor, load_initial_model, resume_state
from nvflare_unlearn.fl.unlearning_controller import UnlearningController
from nvflare_unlearn.models import model_spec
from nvflare_unlearn.options import (
    DEPRECATED_NAMES,
    FederationOptions,
    OptionGroup,
    PlanOptions,
    PrivacyOptions,
    ScoringOptions,
    SecurityOptions,
    SiteDataOptions,
    TrainingOptions,
    rename_deprecated,
    split_options,
)
from nvflare_unlearn.unlearning import JOB_GROUPS, measured_defaults

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

    RESUMABLE: ClassVar[bool] = False  # whether ``resume_from`` may continue an earlier run of the job

    def __init__(
        self,
        *,
        name: Optional[str] = None,
        model: Union[str, Any] = "small_cnn",
        num_classes: int = 10,
        forget_classes: Optional[Union[int, Sequence[int]]] = None,
        initial_ckpt: Optional[str] = None,
        check_ckpt: bool = True,
        resume_from: Optional[str] = None,
        in_channels: Optional[int] = None,
        input_shape: Optional[Sequence[int]] = None,
        test_dataset: Optional[str] = None,
        test_data_root: Optional[str] = None,
        tensorboard: bool = True,
        bundle_code: bool = False,
        train_script: Optional[str] = None,
        train_args: str = "",
        **options: Any,
    ):
        """The arguments every recipe takes (``UnlearningRecipe`` documents them): ``name`` (default: the job kind),
        ``model`` / ``num_classes`` / ``in_channels`` / ``input_shape`` (the architecture), ``forget_classes``,
        ``initial_ckpt`` / ``check_ckpt`` (the starting checkpoint), ``resume_from`` (jobs that resume),
        ``test_dataset`` / ``test_data_root`` (a server-side test set), ``tensorboard``, ``bundle_code``,
        ``train_script`` / ``train_args``; and options, flat or as the groups of ``GROUPS`` (``site_data={...}``)."""
        where = type(self).__name__
        if resume_from is not None and not self.RESUMABLE:
            raise TypeError(f"{where}() got an unexpected keyword argument 'resume_from' (only unlearning resumes)")
        name = self.JOB_KIND if name is None else name
        groups = {g.GROUP: options.pop(g.GROUP, None) for g in self.GROUPS}
        self.num_classes = check_num_classes(num_classes)
        self.forget_classes = normalize_forget_classes(forget_classes, self.num_classes, required=False)
        given = _given_names(options, groups)
        #: the defaults this job chose for options the caller left unset (the CLI names them; the job holds the values)
        self.defaults_applied = {k: v for k, v in self._defaults(given).items() if k not in given}
        flat = {**self.defaults_applied, **options}
        parsed, rest = split_options(flat, self.GROUPS, where, given=groups)
        if rest:
            raise TypeError(f"{where}() got unexpected keyword argument(s) {sorted(rest)}")
        fed = parsed["federation"]
        if fed.min_clients is None:  # written into the job explicitly: every site but one
            quorum = fed.default_quorum(parsed["site_data"].num_clients)
            fed = FederationOptions.from_dict({**fed.to_dict(), "min_clients": quorum})
            parsed["federation"] = fed
        self.options: dict[str, OptionGroup] = parsed
        self.model_name = model_spec(model, input_shape)
        self.num_clients = parsed["site_data"].num_clients
        quorums = fed.quorums(self.num_clients)
        too_many = {p: q for p, q in quorums.items() if q > self.num_clients}
        if too_many:
            raise ValueError(
                f"min_clients exceeds num_clients={self.num_clients} in phase(s) {too_many}: a quorum can be at most "
                "the number of sites"
            )
        self.min_clients = min(quorums.values())  # NVFlare deploys and keeps the job while this many sites live
        self.num_rounds = parsed["federation"].num_rounds
        self.initial_ckpt = initial_ckpt
        self.resume_from = resume_from
        self._carried: dict[str, str] = {}  # file name in the server app's custom/ -> local file the job carries
        self._ckpt_arg = self._server_file(initial_ckpt, "initial_ckpt", check_ckpt)
        self._resume_arg = self._server_file(resume_from, "resume_from", check_ckpt)
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
        # Never let FedJob copy single modules of the plugin: it is either installed on every site (referenced by
        # import path) or bundled whole (``_bundle``), never half.
        job.set_app_packages(["nvflare_unlearn"])
        persistor_id = job.to_server(self._create_persistor(), id="persistor")
        job.to_server(self._create_controller(persistor_id), id="controller")
        self._add_server_components(job)
        if tensorboard:
            job.to_server(TBAnalyticsReceiver(), id="tb_receiver")
        for source in model_files_to_ship(self.model_name) or []:  # the user's model module, when not installed
            job.to_server(source)
        for local in self._carried.values():  # relative checkpoints travel in the server app (NVFlare 2.9's rule)
            job.add_file_to_server(local)
        super().__init__(job)
        if bundle_code:
            self._bundle(["server"])

    # -- hooks (override to swap a component) ------------------------------------------------------------------
    def _defaults(self, given: set[str]) -> dict[str, Any]:
        """This job's defaults for option fields; ``given`` holds the fields the caller set."""
        return dict(self.DEFAULTS)

    def _create_persistor(self) -> UnlearningModelPersistor:
        return UnlearningModelPersistor(
            self.model_name,
            self.num_classes,
            initial_ckpt=self._ckpt_arg,
            resume_from=self._resume_arg,
            output_file=self.OUTPUT_FILE,
            prune_mode=self._group("plan", PlanOptions).prune_mode,
            in_channels=self.in_channels,
            seed=self.options["training"].seed,
        )

    def _create_controller(self, persistor_id: str) -> FedAvgEvalController:
        return FedAvgEvalController(**self._controller_args(persistor_id), job_kind=self.JOB_KIND)

    def _controller_args(self, persistor_id: str) -> dict[str, Any]:
        """What every server workflow here is built with: the model, the U set, the server-side test set, the
        persistor, and the federation and security option groups (as dicts: the exported job's JSON)."""
        return dict(
            model_name=self.model_name,
            num_classes=self.num_classes,
            forget_classes=self.forget_classes,
            federation=self.options["federation"].to_dict(),
            in_channels=self.in_channels,
            test_dataset=self.test_dataset,
            test_data_root=self.test_data_root,
            persistor_id=persistor_id,
            security=self._group("security", SecurityOptions).to_dict(),
        )

    def _create_executor(self, site_config: dict) -> Any:
        """The client component of one site (``site_config``: its ``set_per_site_config`` entry, maybe empty)."""
        script = site_config.get("train_script", self.train_script)
        if script is not None:
            return script_runner(script, site_config.get("train_args", self.train_args))
        # this site's values override the recipe's, field by field, and are validated with their group
        overrides, _ = split_options(
            {k: v for k, v in site_config.items() if k not in _SCRIPT_KEYS},
            SITE_GROUPS,
            f"{type(self).__name__} site config",
        )
        given = {k for k in rename_deprecated(dict(site_config), "site config") if k not in _SCRIPT_KEYS}
        groups = {}
        for g in SITE_GROUPS:
            merged = self._group(g.GROUP, g).to_dict()
            merged.update({k: v for k, v in overrides[g.GROUP].to_dict().items() if k in given})
            groups[g.GROUP] = g.from_dict(merged)
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
        targets = {ALL_SITES: {}} if not self._per_site else self._per_site
        for target, cfg in targets.items():
            self._job.to(self._create_executor(cfg), target, tasks=tasks)
            # site-side experiment tracking (the executor's training loss) reaches the server's receivers
            self._job.to(
                ConvertToFedEvent(events_to_convert=[ANALYTIC_EVENT_TYPE], fed_event_prefix="fed."),
                target,
                id="event_to_fed",
            )
            for source in sources:
                self._job.to(source, target)
        if self.bundle_code:
            self._bundle(list(targets))

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
            self.bundle_code = True
            self._bundle(["server", *[t for t in self._job._deploy_map if t != "server"]])

    def _bundle(self, targets: list[str]) -> None:
        """Carry the WHOLE plugin package (every subpackage, ``__init__.py`` and data file) in the apps' custom/
        folders, for sites where it is not installed (NVFlare puts ``custom/`` on the import path)."""
        source = package_bundle()
        for target in targets:
            self._job.add_file_to(source, target, dest_dir="nvflare_unlearn")

    def _server_file(self, path: Optional[str], what: str, check: bool) -> Optional[str]:
        """NVFlare 2.9's rule for a checkpoint: relative = a file here that the job carries in the server app's
        custom/ (the persistor gets its name); absolute = a path on the server (checked here unless ``check`` is
        off). A relative name that does not exist here with ``check=False`` is expected in the server app's custom/
        at run time (job folders that the submitter completes, like ``job_templates/``)."""
        if path is None:
            return None
        if not isinstance(path, str) or not path:
            raise ValueError(f"{what} must be a checkpoint path, got {path!r}")
        if os.path.isabs(path):
            if check and not os.path.isfile(path):
                raise ValueError(
                    f"{what} {path!r} does not exist: give the checkpoint's path (a relative path is carried in the "
                    "job; for an absolute path on another server machine pass check_ckpt=False)"
                )
            return path
        if not os.path.isfile(path):
            if check:
                raise ValueError(
                    f"{what} {path!r} does not exist here: a relative path names a file on this machine that the job "
                    "carries to the server (NVFlare 2.9's rule); give an existing file or an absolute server path"
                )
            return path
        name = os.path.basename(path)
        if name in self._carried:
            raise ValueError(f"{what} {path!r}: another carried checkpoint is also named {name!r}; rename one")
        self._carried[name] = os.path.abspath(path)
        return name

    def _local_ckpt(self, arg: Optional[str]) -> Optional[str]:
        """The file on this machine behind a checkpoint argument, if there is one (to validate it now)."""
        if arg is None:
            return None
        local = self._carried.get(arg, arg)
        return local if os.path.isfile(local) else None

    # -- helpers -----------------------------------------------------------------------------------------------
    def _group(self, name: str, kind: type[OptionGroup]) -> Any:
        return self.options.get(name) or kind()

    def _site_groups(self) -> dict[str, Any]:
        return {g.GROUP: self._group(g.GROUP, g) for g in SITE_GROUPS}


def _given_names(options: dict, groups: dict) -> set[str]:
    """The option fields a caller set, flat or inside a group (deprecated names counted as their new ones)."""
    names = set(options)
    for g in groups.values():
        names |= set(g.to_dict() if isinstance(g, OptionGroup) else (g or {}))
    return names | {new for old, new in DEPRECATED_NAMES.items() if old in names}


class PretrainRecipe(_JobRecipe):
    """FedAvg on all classes with the plugin's executor; writes ``global_model.pt`` (weights + empty plan) and
    ``unlearning_metrics.json`` (per-round accuracy) into the server's run directory. Pass the model file as
    ``initial_ckpt`` of an ``UnlearningRecipe``.

    Options (flat or as groups, see ``nvflare_unlearn.options``): ``site_data`` (dataset, data_root, partition,
    num_clients, ...), ``training`` (local_epochs, lr, batch_size, seed, ...), ``federation`` (num_rounds,
    min_clients, task_timeout, stop_cond, ...), ``security`` (declared site sizes, robust update aggregation,
    the record's signing key). Defaults here: ``lr=0.05``, ``num_rounds=5``. The other arguments (``name``, ``model``,
    ``num_classes``, ``initial_ckpt``, ``forget_classes``, ...) are every recipe's (``_JobRecipe``).
    """

    DEFAULTS: ClassVar[dict[str, Any]] = {"lr": 0.05, "num_rounds": 5}
    JOB_KIND: ClassVar[str] = "pretrain"


class RetrainRecipe(PretrainRecipe):
    """FedAvg from scratch on the retained classes only (sites drop ``forget_classes``): the gold standard an
    unlearned model is compared with. Reports U/R accuracy per round like the unlearning job."""

    JOB_KIND: ClassVar[str] = "retrain"

    def __init__(self, *, forget_classes: Sequence[int], num_classes: int = 10, **kwargs: Any):
        normalize_forget_classes(forget_classes, num_classes)
        if kwargs.get("initial_ckpt") is not None:
            raise ValueError("retraining starts from scratch: do not pass initial_ckpt")
        super().__init__(num_classes=num_classes, forget_classes=forget_classes, **kwargs)


class UnlearningRecipe(_JobRecipe):
    """Federated class unlearning of a trained model (Wang et al., WWW 2022), end to end in one job.

    Outputs in the server's run directory: ``pruned_model.pt`` (after pruning), ``pruning_plan.json``,
    ``unlearned_model.pt`` (after fine-tuning; weights + plan), ``unlearning_metrics.json`` and the audit record
    ``unlearning_record.json``.

    Args:
        model / num_classes / in_channels / input_shape: the trained model's architecture: a registry name, your
            own model as an import path ``"package.module:factory"``, or the factory itself (``models.model_spec``).
        initial_ckpt: the trained model (our checkpoint, a state_dict .pt, or NVFlare's FL_global_model.pt). As in
            NVFlare 2.9's recipes: a relative path is a file here that the job carries in the server app; an absolute
            path is a file on the server (checked here, unless ``check_ckpt=False``). Never modified.
        forget_classes: class id(s) to forget (``method="prune"``: one statistics + pruning pass per class).
        unlearning / scoring / plan / privacy / site_data / training / federation / security: the option groups
            (``nvflare_unlearn.options``), as dicts or group objects; any field may also be given flat
            (``method="neggrad"``, ``recovery="kd"``, ``prune_ratio=0.2``). Defaults here: ``num_rounds=3``,
            ``lr=0.01``, and the measured best method (``unlearning.defaults``, read from the committed evidence)
            unless a method or a pruning option is given; ``method="prune"`` is the paper's method.
        test_dataset / test_data_root: optional server-side test set evaluated centrally at every stage.
        tensorboard: add NVFlare's TensorBoard receiver (U/R accuracy by round under the run's tb_events/).
        bundle_code: copy the plugin's whole package into the job (BYOC) instead of referencing the installed one.
        resume_from: a round checkpoint (``unlearned_model.pt`` or ``pruned_model.pt``) of an earlier run of this
            request that stopped or crashed: fine-tuning goes on after its last saved round with its plan (same path
            rule as ``initial_ckpt``, which must still name the original model); the record says so.
        train_script / train_args: run your own Client API script on the sites instead of the plugin's executor
            (it must answer the three tasks, see ``nvflare_unlearn.fl.client_api``); the site_data options are
            then unused, the script loads its own data.
    """

    GROUPS: ClassVar[tuple[type[OptionGroup], ...]] = JOB_GROUPS  # every option group of an unlearning job
    JOB_KIND: ClassVar[str] = "unlearn"
    OUTPUT_FILE: ClassVar[str] = FINAL_MODEL_FILE
    RESUMABLE: ClassVar[bool] = True

    def __init__(
        self, *, initial_ckpt: str, forget_classes: Union[int, Sequence[int]], num_classes: int = 10, **options: Any
    ):
        if not initial_ckpt or not isinstance(initial_ckpt, str):
            raise ValueError("initial_ckpt must name the trained model's checkpoint file")
        normalize_forget_classes(forget_classes, num_classes)
        super().__init__(initial_ckpt=initial_ckpt, forget_classes=forget_classes, num_classes=num_classes, **options)
        self.prune_ratio = self.options["plan"].prune_ratio
        mode = self.options["plan"].prune_mode
        method = self.options["unlearning"].method
        if not self.options["unlearning"].spec.prunes and self.num_rounds == 0:
            chosen = f" ({self.method_default.reason})" if "method" in self.defaults_applied else ""
            raise ValueError(
                f"method={method!r}{chosen} unlearns by training at the sites: num_rounds=0 would leave the model "
                "unchanged; give num_rounds >= 1, or method='prune' to prune only"
            )
        for arg in (self._ckpt_arg, self._resume_arg):  # corrupt file or wrong architecture: say so now
            local = self._local_ckpt(arg)
            if local is not None:
                load_initial_model(local, self.model_name, self.num_classes, self.in_channels, mode)
        local_resume = self._local_ckpt(self._resume_arg)
        if local_resume is not None:  # the controller checks it again against the files on the server
            state = resume_state(local_resume)
            problem = resume_problem(
                state, self.forget_classes, self.num_rounds, source=f"resume_from {self.resume_from!r}"
            )
            if problem:
                raise ValueError(problem)

    def _defaults(self, given: set[str]) -> dict[str, Any]:
        #: the method this job chose for a request that named none, and why (``reason`` is "" when it named one)
        self.method_default = measured_defaults(given)
        return {**super()._defaults(given), **self.method_default.values}

    def _create_controller(self, persistor_id: str) -> UnlearningController:
        return UnlearningController(
            **self._controller_args(persistor_id),
            **{g: self.options[g].to_dict() for g in ("unlearning", "scoring", "plan", "privacy")},
            aggregator_id="activation_aggregator",
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
