"""The NVFlare layer: the only part of nvflare_unlearn that imports nvflare.

Client: ``UnlearningExecutor`` (or ``client_api`` helpers for your own Client API script).
Server: ``UnlearningController`` / ``FedAvgEvalController``, ``ActivationAggregator``, ``UnlearnModelPersistor``.
Jobs: ``UnlearningRecipe``, ``PretrainRecipe``, ``RetrainRecipe``; outputs via ``read_job_result``.
"""

from .aggregator import ActivationAggregator
from .controller import FedAvgEvalController, UnlearningController
from .defs import (
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
from .executor import UnlearningExecutor
from .persistor import UnlearnModelPersistor
from .recipes import (
    ALLOW_LIST_ENTRY,
    PretrainRecipe,
    RetrainRecipe,
    UnlearningRecipe,
    authorize_poc_workspace,
    authorize_site_config,
    quiet_log_config,
    resolve_model_name,
)
from .results import JobResult, read_job_result

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
    "RECORD_FILE",
    "RetrainRecipe",
    "TASK_ACTIVATIONS",
    "TASK_TRAIN",
    "TASK_VALIDATE",
    "UnlearnModelPersistor",
    "UnlearningController",
    "UnlearningExecutor",
    "UnlearningRecipe",
    "authorize_poc_workspace",
    "authorize_site_config",
    "quiet_log_config",
    "read_job_result",
    "resolve_model_name",
]
