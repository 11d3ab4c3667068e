"""The NVFlare layer, thin: every nvflare import of the package is here (and in ``cli``).

Client: ``UnlearningExecutor`` (or the ``client_api`` helpers for your own Client API script).
Server: ``UnlearningController`` / ``FedAvgEvalController`` (one per file), ``ActivationAggregator``,
``UnlearningModelPersistor``. Jobs: ``UnlearningRecipe``, ``PretrainRecipe``, ``RetrainRecipe`` (``recipes``) and what
they need around them (``job_utils``); run anywhere with ``run_job`` (``run``), outputs via ``read_job_result``
(``results``); a local POC system safe beside others: ``PrivatePocEnv`` (``poc``, NVFlare's public API only). May
import anything in the package but ``cli``.
"""

from nvflare_unlearn.fl.aggregator import ActivationAggregator
from nvflare_unlearn.fl.defs import (
    FINAL_MODEL_FILE,
    GLOBAL_MODEL_FILE,
    METRICS_FILE,
    PLAN_FILE,
    PRUNED_MODEL_FILE,
    RECORD_FILE,
    TASK_ACTIVATIONS,
    TASK_TRAIN,
    TASK_VALIDATE,
)
from nvflare_unlearn.fl.executor import UnlearningExecutor
from nvflare_unlearn.fl.fedavg_eval_controller import FedAvgEvalController
from nvflare_unlearn.fl.job_utils import (
    ALLOW_LIST_ENTRY,
    authorize_poc_workspace,
    authorize_site_config,
    quiet_log_config,
)
from nvflare_unlearn.fl.persistor import UnlearningModelPersistor, UnlearnModelPersistor
from nvflare_unlearn.fl.poc import PrivatePocEnv
from nvflare_unlearn.fl.recipes import PretrainRecipe, RetrainRecipe, UnlearningRecipe
from nvflare_unlearn.fl.results import JobResult, read_job_result
from nvflare_unlearn.fl.run import run_job
from nvflare_unlearn.fl.unlearning_controller import UnlearningController

__all__ = [
    "ALLOW_LIST_ENTRY",
    "ActivationAggregator",
    "FINAL_MODEL_FILE",
    "FedAvgEvalController",
    "GLOBAL_MODEL_FILE",
    "JobResult",
    "METRICS_FILE",
    "PLAN_FILE",
    "PRUNED_MODEL_FILE",
    "PretrainRecipe",
    "PrivatePocEnv",
    "RECORD_FILE",
    "RetrainRecipe",
    "TASK_ACTIVATIONS",
    "TASK_TRAIN",
    "TASK_VALIDATE",
    "UnlearnModelPersistor",
    "UnlearningController",
    "UnlearningExecutor",
    "UnlearningModelPersistor",
    "UnlearningRecipe",
    "authorize_poc_workspace",
    "authorize_site_config",
    "quiet_log_config",
    "read_job_result",
    "run_job",
]
