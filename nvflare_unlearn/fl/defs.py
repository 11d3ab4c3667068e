"""Names shared by the server and client halves of the NVFlare layer: task names, FLModel meta keys, output files.

Both halves import these, so a renamed task or key cannot silently desynchronise a controller and its executors.
"""

from __future__ import annotations

# Task names (the controller sends them; the executor and the Client API helpers branch on them).
TASK_ACTIVATIONS = "class_activations"
TASK_TRAIN = "train"
TASK_VALIDATE = "validate"
TASK_VERIFY = "verify"  # the forgetting check at the end of an unlearning job (runtime.verification)

# FLModel.meta keys. The plan travels with the weights on EVERY task: NVFlare does not keep meta across rounds.
META_PLAN = "pruning_plan"  # PruningPlan.to_json() text, or absent for an unpruned model
META_PRUNE_MODE = "prune_mode"  # "remove" (physical) or "mask" (shapes kept, channels held at zero)
META_FORGET = "forget_classes"  # list[int]: sites drop these classes from their local training data
META_HOOK_POINT = "hook_point"  # where activations are read ("conv" = raw conv output, the paper's choice)
META_MODEL_NAME = "model_name"
META_NUM_CLASSES = "num_classes"
META_ORIGINAL_CKPT = "original_ckpt"  # persistor -> controller: {"path", "sha256"} of the checkpoint it loaded
META_OUTPUT_FILE = "output_file"  # persistor -> controller: the file name it saves the global model under
META_METHOD = "unlearning_method"  # MethodOptions as a dict: the sites' training objective (unlearning.objective)
META_VERIFY = "verify"  # TASK_VERIFY: {"round": "stats"} or {"round": "scores", "w": [...], "edges": [...]}
TEACHER_PREFIX = "teacher/"  # params keys of the original model sent along when the objective distils from it
META_TEACHER_PLAN = "teacher_plan"  # the plan of that original model, when it had been pruned before
META_RESUME = "resume"  # controller <-> persistor: the job state saved with each round (resume_from=)
META_PRIVACY = "privacy"  # activation task: the PrivacyOptions the job asks the sites to apply
META_PRIVACY_APPLIED = "privacy_applied"  # activation report: what this site actually applied
META_OBJECTIVE_APPLIED = "objective_applied"  # train result: {"loss", "steps", "forget_steps"} this site minimised
META_DP_SIGMA = "dp_sigma"  # DXO meta of an activation report: std of the Gaussian noise the site added (0 = none)

# Keys of the per-class evaluation metrics a site returns for TASK_VALIDATE (counts only, never samples).
METRIC_CORRECT = "correct"
METRIC_TOTAL = "total"

# Files the server writes into its run directory.
METRICS_FILE = "unlearning_metrics.json"
FINAL_MODEL_FILE = "unlearned_model.pt"
PRUNED_MODEL_FILE = "pruned_model.pt"
PLAN_FILE = "pruning_plan.json"
RECORD_FILE = "unlearning_record.json"  # audit record (nvflare_unlearn.protect.record), unlearning jobs only
RECORD_PUBLIC_KEY_FILE = (
    "record_public_key.pem"  # public key of the record's signer (a convenience, not a trust anchor)
)
GLOBAL_MODEL_FILE = "global_model.pt"  # pretraining / retraining output
PROGRESS_FILE = "progress.json"  # phase, round, U/R so far: what the CLI shows while a job runs

# The group under which the controllers answer the admin's ``show_stats`` (POC / production progress).
PROGRESS_STATS_GROUP = "unlearning_progress"
