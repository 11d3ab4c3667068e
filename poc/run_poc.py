"""Run the exported job folders in a real local NVFlare POC system, end to end.

    python poc/run_poc.py --sites 2 --out runs/poc

1. ``nvflare poc prepare -n N --force`` (server + N site processes + an admin startup kit, all on this machine);
2. allow the plugin's components on every site (``class_allow_list``: what a production site admin does once);
3. ``nvflare poc start``; each site reads its own slice of the built-in digits data (``site-k`` -> slice k,
   chosen inside the site process: no data crosses to the server);
4. ``nvflare job submit -j job_templates/pretrain_digits``, ``nvflare job wait``, ``nvflare job download``;
5. copy the pretrained model to the path the unlearning template names (never the downloaded original);
6. the same for ``job_templates/unlearn_digits``; read its ``unlearning_metrics.json`` and print U/R accuracy;
7. ``nvflare poc stop``, whatever happened.
Exits non-zero when any job did not complete (judged from the job's own record, not the CLI's exit code).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
NVFLARE = os.path.join(os.path.dirname(sys.executable), "nvflare")


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def nvflare(*args: str, timeout: float = 600, check: bool = True) -> str:
    """Run one ``nvflare`` CLI command; return its stdout (stderr is shown when it fails)."""
    cmd = [NVFLARE if os.path.exists(NVFLARE) else "nvflare", *args]
    say("$ " + " ".join(["nvflare", *args]))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`nvflare {' '.join(args)}` exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout + proc.stderr


def poc_workspace() -> str:
    from nvflare.tool.poc.poc_commands import get_poc_workspace

    return get_poc_workspace()


def submit_and_wait(job_folder: str, out_dir: str, timeout: float) -> str:
    """Submit a job folder, wait for it, download its result; returns the download folder."""
    text = nvflare("job", "submit", "-j", job_folder)
    match = re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", text)
    if not match:
        raise RuntimeError(f"could not find the job id in the submit output:\n{text}")
    job_id = match.group(0)
    say(f"job {os.path.basename(job_folder)} submitted as {job_id}")
    nvflare("job", "wait", job_id, "--timeout", str(int(timeout)), timeout=timeout + 60)
    nvflare("job", "download", job_id, "-o", out_dir, "--force")
    return out_dir


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-clients", type=int, default=2, help="number of POC sites (the templates expect 2)")
    p.add_argument("--out", default=os.path.join(REPO, "runs", "poc"), help="new folder for downloaded results")
    p.add_argument("--templates", default=os.path.join(REPO, "job_templates"))
    p.add_argument("--timeout", type=float, default=900, help="seconds to wait for each job")
    a = p.parse_args()

    sys.path.insert(0, REPO)
    from nvflare_unlearn.cli.templates import TEMPLATE_CKPT
    from nvflare_unlearn.fl import authorize_poc_workspace, read_job_result

    out = os.path.abspath(a.out)
    if os.path.exists(out) and os.listdir(out):
        print(f"error: --out {out} exists and is not empty: every run writes to a new folder", file=sys.stderr)
        return 2
    os.makedirs(out, exist_ok=True)
    started = time.time()
    nvflare("poc", "prepare", "-n", str(a.num_clients), "--force")
    ws = poc_workspace()
    for path in authorize_poc_workspace(ws):
        say(f"allowed nvflare_unlearn.fl in {os.path.relpath(path, ws)}")
    try:
        nvflare("poc", "start", timeout=300)
        time.sleep(5)
        pre = submit_and_wait(os.path.join(a.templates, "pretrain_digits"), os.path.join(out, "pretrain"), a.timeout)
        pre_result = read_job_result(pre)
        say(f"pretraining: {pre_result.rounds} rounds, federated accuracy {pre_result.metrics['final']['acc']:.3f}")
        os.makedirs(os.path.dirname(TEMPLATE_CKPT), exist_ok=True)
        if os.path.exists(TEMPLATE_CKPT):  # a copy from an earlier POC run: move it aside, never overwrite
            os.replace(TEMPLATE_CKPT, f"{TEMPLATE_CKPT}.{int(time.time())}.bak")
        shutil.copy2(pre_result.model_path, TEMPLATE_CKPT)
        say(f"pretrained model copied to {TEMPLATE_CKPT} (the path job_templates/unlearn_digits names)")
        unl = submit_and_wait(os.path.join(a.templates, "unlearn_digits"), os.path.join(out, "unlearn"), a.timeout)
        m = read_job_result(unl).metrics
    finally:
        nvflare("poc", "stop", timeout=300, check=False)
    summary = {
        "forget_classes": m.get("forget_classes"),
        **{
            stage: {k: m.get(stage, {}).get(k) for k in ("u_acc", "r_acc")}
            for stage in ("original", "pruned", "unlearned")
        },
        "params_before": m.get("params_before"),
        "params_after": m.get("params_after"),
        "rounds": m.get("rounds"),
        "sites": m.get("unlearned", {}).get("sites"),
        "wall_seconds": round(time.time() - started, 1),
    }
    with open(os.path.join(out, "poc_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    say("unlearning in POC: " + json.dumps(summary))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"POC run failed: {e}", file=sys.stderr)
        sys.exit(1)
