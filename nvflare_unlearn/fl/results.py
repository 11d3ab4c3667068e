"""Reading a finished job's outputs wherever NVFlare put them (running a job: ``run``; the POC system: ``poc``).

``read_job_result(folder)`` checks one result folder: for ``SimEnv`` the simulator workspace
(``<root>/<job>/server/simulate_job`` holds the server's run directory), for ``PocEnv`` / ``ProdEnv`` the downloaded
job result. The server writes ``unlearning_metrics.json`` and the model files into its run directory, so we look for
the metrics file below the folder. NVFlare's simulator can exit 0 after a failed job, so a missing file or
``status != "completed"`` is an error here, with the reason from the record or the server log. Nothing here imports
NVFlare: a result folder is read the same way whoever ran the job.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Optional

from nvflare_unlearn.fl import defs  # the file names a finished job leaves

#: what ``log_hint`` says when the logs hold no error
NO_ERROR = "no error found in the logs"
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
    record_path: Optional[str] = (
        None  # unlearning_record.json (unlearning jobs; protect.verify.verify_record checks it)
    )
    files: dict = field(default_factory=dict)
    job_id: Optional[str] = None
    status: Optional[str] = None  # NVFlare's final job status (POC / production; None in the simulator)

    @property
    def rounds(self) -> int:
        return int(self.metrics.get("rounds", 0))


def find_files(root: str, filename: str) -> list[str]:
    """Every ``filename`` below ``root``, shallowest first (the server's run directory before deeper copies)."""
    hits = []
    for dirpath, _dirs, files in os.walk(root):
        if filename in files:
            hits.append(os.path.join(dirpath, filename))
    return sorted(hits, key=lambda p: (p.count(os.sep), p))


def log_hint(root: str) -> str:
    """The most useful line of the server log when a job left no record (authorization errors first)."""
    for log in find_files(root, "log.txt"):
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
    return NO_ERROR


def read_job_result(result_dir: Optional[str]) -> JobResult:
    """Locate and check a finished job's outputs; raises RuntimeError when the job did not complete."""
    if not result_dir or not os.path.isdir(result_dir):
        raise RuntimeError(f"job result folder {result_dir!r} does not exist: the job did not run or was not fetched")
    hits = find_files(result_dir, defs.METRICS_FILE)
    if not hits:
        hint = log_hint(result_dir)
        raise RuntimeError(f"the job wrote no {defs.METRICS_FILE} under {result_dir}: it did not finish; {hint}")
    metrics_path = hits[0]
    run_dir = os.path.dirname(metrics_path)
    with open(metrics_path) as f:
        metrics = json.load(f)
    if metrics.get("status") != "completed":
        raise RuntimeError(f"the job failed: {metrics.get('error', 'no reason recorded')} (record: {metrics_path})")
    model_file = defs.FINAL_MODEL_FILE if metrics.get("job_kind") == "unlearn" else defs.GLOBAL_MODEL_FILE
    candidates = [os.path.join(run_dir, model_file)] + find_files(result_dir, model_file)
    model_path = next((p for p in candidates if os.path.isfile(p)), None)
    if model_path is None:
        raise RuntimeError(f"the job completed but its model file {model_file} is missing under {result_dir}")
    pruned = os.path.join(run_dir, defs.PRUNED_MODEL_FILE)
    plan = os.path.join(run_dir, defs.PLAN_FILE)
    tb = os.path.join(run_dir, "tb_events")
    record = os.path.join(run_dir, defs.RECORD_FILE)
    if metrics.get("job_kind") == "unlearn" and not os.path.isfile(record):
        raise RuntimeError(f"the unlearning job completed but wrote no audit record {defs.RECORD_FILE} in {run_dir}")
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


def dropped_sites(m: dict) -> str:
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
