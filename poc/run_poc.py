"""Run the plugin's jobs in a real local NVFlare POC system, every route a user has, and write what happened.

    python poc/run_poc.py --out runs/poc                       # all routes; summary + console log in --out
    python poc/run_poc.py --out runs/poc --doc docs/poc.md     # ... and regenerate docs/poc.md from this run

Routes (``--routes``, default all):

- ``templates``: the config-driven user. ``nvflare poc prepare`` + allow ``nvflare_unlearn.fl`` on every site
  (``class_allow_list``) + ``nvflare poc start``; ``nvflare job submit -j job_templates/pretrain_digits``, ``nvflare
  job wait``, ``nvflare job download``; then a copy of ``job_templates/unlearn_digits`` with the pretrained model put
  in its ``app/custom/pretrained_model.pt`` (the templates name the checkpoint, never a path); ``nvflare poc stop``.
- ``recipe``: the Python user. ``PretrainRecipe`` then ``UnlearningRecipe`` through ``PrivatePocEnv`` (NVFlare's
  ``PocEnv`` in a private workspace on free ports) with ``nvflare_unlearn.fl.run_job`` (each job provisions a fresh
  POC system; the result is downloaded before it stops).
- ``cli``: the shell user. ``nvflare-unlearn pretrain --env poc`` then ``nvflare-unlearn unlearn --env poc`` with
  no method flag: the job's default method (NegGrad+ with distillation), where the other routes prune.
- ``prod``: the production route. A POC system started by hand stands in for a deployment; ``nvflare-unlearn ...
  --env prod --startup-kit <its admin kit>`` submits through NVFlare's ``ProdEnv``, the package installed and
  allowed on the sites (no code in the job).
- ``kill``: dead sites. The unlearning job on 3 sites, once undisturbed and twice with site-3 killed (SIGKILL of its
  processes) as soon as the server reports (a) the activation phase, (b) fine-tuning round 2.

Each job's status is NVFlare's own (``FINISHED:COMPLETED`` or not) plus the job's record; a route that fails is
written down as failed, and the script exits 1. Every POC system started here is stopped, and what is left of the
processes it started is ended by their ids (never by a name). The ``templates`` and ``prod`` routes use ``nvflare
poc`` as a user would: NVFlare's configured POC workspace and default ports, so no other POC system may run there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BIN = os.path.dirname(sys.executable)
DOC_BLOCK = "poc-run"
ROUTES = ("templates", "recipe", "cli", "prod", "kill")
DIGITS = dict(model="small_cnn", num_classes=10, in_channels=1, dataset="digits")
#: the jobs every route runs (as the job templates do): 5 pretraining rounds, forget digit 3 at ratio 0.3, 3 rounds;
#: the CLI routes leave the method to the job's default (no ``prune_ratio``: NegGrad+ with distillation)
PRETRAIN = dict(num_rounds=5, lr=0.05)
UNLEARN = dict(forget_classes=[3], prune_ratio=0.3, num_rounds=3, lr=0.01)

_LOG: list[str] = []


def say(msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    _LOG.append(line)
    print(line, flush=True)


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def cmd(*args: str, timeout: float = 900, check: bool = True, show: Optional[str] = None) -> str:
    """Run one command (``nvflare`` / ``nvflare-unlearn`` from this interpreter's bin folder); return its output."""
    exe = os.path.join(BIN, args[0])
    full = [exe if os.path.exists(exe) else args[0], *args[1:]]
    say("$ " + (show or " ".join(args)))
    proc = subprocess.run(full, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    out = proc.stdout + proc.stderr
    if check and proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(args)}` exited {proc.returncode}:\n{out[-3000:]}")
    return out


def job_summary(result: Any, seconds: float) -> dict:
    """The numbers a reader compares, from a checked JobResult."""
    m = result.metrics
    out: dict[str, Any] = {
        "job_id": result.job_id,
        "status": result.status,
        "record_status": m.get("status"),
        "job_kind": m.get("job_kind"),
        "rounds": m.get("rounds"),
        "seconds": round(seconds, 1),
    }
    if m.get("job_kind") == "unlearn":
        out.update(unlearn_numbers(m))
    else:
        out["final_acc"] = (m.get("final") or {}).get("acc")
    return out


def unlearn_numbers(m: dict) -> dict:
    """What an unlearning job's metrics say: the method, U/R per stage, parameters, sites, the losses sites ran."""
    u = (m.get("options") or {}).get("unlearning") or {}
    out: dict[str, Any] = {"method": f"{u.get('method')}" + ("+kd" if u.get("recovery") == "kd" else "")}
    for stage in ("original", "pruned", "unlearned"):
        out[stage] = {k: (m.get(stage) or {}).get(k) for k in ("u_acc", "r_acc")}
    out["params"] = [m.get("params_before"), m.get("params_after")]
    out["sites"] = phase_sites(m)
    out["objective"] = m.get("objective")
    return out


def phase_sites(m: dict) -> dict:
    """Which sites contributed to each phase (and which gave no result), from the job's record."""
    sites: dict[str, Any] = {}
    for a in m.get("activation_rounds", []):
        sites[f"activation class {a['forget_class']}"] = {"used": a.get("sites"), "no_result": a.get("no_result")}
    for r in m.get("per_round", []):
        sites[f"finetune round {r['round']}"] = {"trained": r.get("trained_sites"), "no_result": r.get("no_result")}
    return sites


# ------------------------------------------------------------------------------------------------ the routes
def route_recipe(out: str, num_clients: int = 2) -> dict:
    """PretrainRecipe then UnlearningRecipe through PocEnv (nvflare_unlearn.fl.run_job)."""
    from nvflare_unlearn.fl import PretrainRecipe, PrivatePocEnv, UnlearningRecipe, run_job

    t0 = time.time()
    pre = PretrainRecipe(name="pretrain_digits", num_clients=num_clients, **DIGITS, **PRETRAIN)
    say(f"recipe: PretrainRecipe(...) via run_job(recipe, PrivatePocEnv(num_clients={num_clients}), dest)")
    pre_result = run_job(pre, PrivatePocEnv(num_clients=num_clients), os.path.join(out, "pretrain"))
    pre_s = time.time() - t0
    say(f"recipe: pretraining {pre_result.status}, accuracy {pre_result.metrics['final']['acc']:.3f}")
    ckpt = os.path.join(out, "pretrained_model.pt")
    shutil.copy2(pre_result.model_path, ckpt)
    before = sha256(ckpt)
    t1 = time.time()
    unl = UnlearningRecipe(name="unlearn_digits", initial_ckpt=ckpt, num_clients=num_clients, **DIGITS, **UNLEARN)
    say("recipe: UnlearningRecipe(...) via run_job(recipe, PrivatePocEnv(...), dest)")
    result = run_job(unl, PrivatePocEnv(num_clients=num_clients), os.path.join(out, "unlearn"))
    summary = job_summary(result, time.time() - t1)
    say(f"recipe: unlearning {result.status}: {json.dumps({k: summary[k] for k in ('original', 'unlearned')})}")
    return {
        "pretrain": job_summary(pre_result, pre_s),
        "unlearn": summary,
        "original_unchanged": sha256(ckpt) == before,
        "checkpoint": ckpt,
    }


def _cli_job_status(out: str) -> tuple[Optional[str], Optional[str]]:
    """(job id, NVFlare status) of a CLI run, from the downloaded result's meta.json."""
    metas = [os.path.join(d, "meta.json") for d in _result_dirs(out)]
    for meta in metas:
        if os.path.isfile(meta):
            with open(meta) as f:
                data = json.load(f)
            return data.get("job_id"), data.get("status")
    return None, None


def _result_dirs(out: str) -> list[str]:
    root = os.path.join(out, "workspace", "result")
    return [os.path.join(root, d) for d in sorted(os.listdir(root))] if os.path.isdir(root) else []


def route_cli(out: str, env_args: list[str], label: str, num_clients: int = 2) -> dict:
    """nvflare-unlearn pretrain, then unlearn, with ``env_args`` (--env poc, or --env prod --startup-kit K)."""
    common = ["--num-clients", str(num_clients), "--in-channels", "1", "--dataset", "digits"]
    pre_out, unl_out = os.path.join(out, "pretrain"), os.path.join(out, "unlearn")
    show_env = " ".join(a if not os.path.isabs(a) else "<admin startup kit>" for a in env_args)

    def run_cli(command: str, flags: dict, out_dir: str, shown: str) -> str:
        argv = [f for k, v in flags.items() for f in (f"--{k}", str(v))]
        show = f"nvflare-unlearn {command} {show_env} {shown} --out OUT/{os.path.basename(out_dir)}"
        return cmd("nvflare-unlearn", command, *env_args, *common, *argv, "--out", out_dir, show=show)

    t0 = time.time()
    pre_flags = {"num-rounds": PRETRAIN["num_rounds"], "lr": PRETRAIN["lr"]}
    text = run_cli("pretrain", pre_flags, pre_out, f"--num-rounds {PRETRAIN['num_rounds']}")
    pre_s = time.time() - t0
    for line in text.splitlines():
        if line.startswith("[") and "pretraining" in line or line.startswith("[") and "model:" in line:
            say(f"{label}: {line[11:]}")
    ckpt = os.path.join(pre_out, "global_model.pt")
    before = sha256(ckpt)
    t1 = time.time()
    unl_flags = {"ckpt": ckpt, "forget-classes": 3, "num-rounds": UNLEARN["num_rounds"], "lr": UNLEARN["lr"]}
    shown = f"--ckpt OUT/pretrain/global_model.pt --forget-classes 3 --num-rounds {UNLEARN['num_rounds']}"
    text = run_cli("unlearn", unl_flags, unl_out, shown)
    unl_s = time.time() - t1
    for line in text.splitlines():
        if line.strip():
            say(f"{label}: {line.rstrip()}")
    with open(os.path.join(unl_out, "job_metrics.json")) as f:
        m = json.load(f)
    pre_id, pre_status = _cli_job_status(pre_out)
    unl_id, unl_status = _cli_job_status(unl_out)
    summary = {
        "job_id": unl_id,
        "status": unl_status,
        "record_status": m.get("status"),
        "rounds": m.get("rounds"),
        "seconds": round(unl_s, 1),
        **unlearn_numbers(m),
    }
    return {
        "pretrain": {"job_id": pre_id, "status": pre_status, "seconds": round(pre_s, 1)},
        "unlearn": summary,
        "original_unchanged": sha256(ckpt) == before,
    }


def start_poc(num_clients: int, allow: bool) -> tuple[str, Any]:
    """``nvflare poc prepare`` (+ allow the plugin on every site) + ``nvflare poc start``; returns the admin kit and
    the started system's processes, followed from the ids its supervisors wrote (``daemon_pid.fl``)."""
    from poc_tools import poc_workspace

    from nvflare_unlearn.fl import authorize_poc_workspace
    from nvflare_unlearn.fl.processes import ProcessTracker

    cmd("nvflare", "poc", "prepare", "-n", str(num_clients), "--force")
    ws = poc_workspace()
    if allow:
        for path in authorize_poc_workspace(ws):
            if "site-" in path or "server" in path:
                say(f"allowed nvflare_unlearn.fl in {os.path.relpath(path, ws)}")
    cmd("nvflare", "poc", "start", timeout=300)
    tracker = ProcessTracker()
    for pid_file in _glob(ws, "*", "prod_*", "*", "daemon_pid.fl"):
        with open(pid_file) as f:
            tracker.add(int(f.read().strip()))
    time.sleep(10)
    kits = [p for p in _glob(ws, "*", "prod_*", "admin@nvidia.com") if os.path.isdir(p)]
    if not kits:
        tracker.end(0)
        raise RuntimeError(f"no admin startup kit under {ws}")
    return sorted(kits)[-1], tracker


def stop_poc(tracker: Any) -> list[int]:
    """``nvflare poc stop``, then end what is left of the processes ``start_poc`` started (ids returned)."""
    cmd("nvflare", "poc", "stop", timeout=300, check=False)
    return tracker.end(30.0)


def _glob(*parts: str) -> list[str]:
    import glob

    return glob.glob(os.path.join(*parts))


def _submit_template(job_folder: str, out_dir: str, kit: str, timeout: float) -> dict:
    """nvflare job submit / wait / download of one job folder; NVFlare's status from the admin API."""
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    from nvflare_unlearn.fl import read_job_result

    t0 = time.time()
    rel = (
        os.path.relpath(job_folder, REPO) if job_folder.startswith(REPO) else "OUT/jobs/" + os.path.basename(job_folder)
    )
    text = cmd("nvflare", "job", "submit", "-j", job_folder, show=f"nvflare job submit -j {rel}")
    match = re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", text)
    if not match:
        raise RuntimeError(f"no job id in the submit output:\n{text}")
    job_id = match.group(0)
    cmd(
        "nvflare",
        "job",
        "wait",
        job_id,
        "--timeout",
        str(int(timeout)),
        timeout=timeout + 60,
        check=False,
        show=f"nvflare job wait <job id> --timeout {int(timeout)}",
    )
    sess = new_secure_session(username="admin@nvidia.com", startup_kit_location=kit, timeout=30.0)
    try:
        status = sess.get_job_meta(job_id).get("status")
    finally:
        sess.close()
    cmd("nvflare", "job", "download", job_id, "-o", out_dir, "--force", show="nvflare job download <job id> -o OUT")
    result = read_job_result(out_dir)
    result.job_id, result.status = job_id, status
    if status != "FINISHED:COMPLETED":
        raise RuntimeError(f"NVFlare finished {os.path.basename(job_folder)} as {status}")
    return job_summary(result, time.time() - t0)


def route_templates(out: str, templates: str, timeout: float) -> dict:
    kit, tracker = start_poc(2, allow=True)
    try:
        pre = _submit_template(os.path.join(templates, "pretrain_digits"), os.path.join(out, "pretrain"), kit, timeout)
        say(f"templates: pretraining {pre['status']}, accuracy {pre['final_acc']:.3f}")
        from nvflare_unlearn.cli.templates import TEMPLATE_CKPT
        from nvflare_unlearn.fl import read_job_result

        job = os.path.join(out, "jobs", "unlearn_digits")
        shutil.copytree(os.path.join(templates, "unlearn_digits"), job)
        custom = os.path.join(job, "app", "custom")
        os.makedirs(custom, exist_ok=True)
        shutil.copy2(read_job_result(os.path.join(out, "pretrain")).model_path, os.path.join(custom, TEMPLATE_CKPT))
        say(f"templates: pretrained model copied into the job folder as app/custom/{TEMPLATE_CKPT}")
        unl = _submit_template(job, os.path.join(out, "unlearn"), kit, timeout)
        say(f"templates: unlearning {unl['status']}: original {unl['original']}, unlearned {unl['unlearned']}")
    finally:
        ended = stop_poc(tracker)
        if ended:
            say(f"templates: ended {len(ended)} leftover POC process(es)")
    return {"pretrain": pre, "unlearn": unl}


def route_prod(out: str) -> dict:
    kit, tracker = start_poc(2, allow=True)
    try:
        return route_cli(out, ["--env", "prod", "--startup-kit", kit], "prod")
    finally:
        ended = stop_poc(tracker)
        if ended:
            say(f"prod: ended {len(ended)} leftover POC process(es)")


def kill_run(
    out: str, ckpt: str, when: Optional[str], num_clients: int = 3, victim: str = "site-3", job_only: bool = False
) -> dict:
    """The unlearning job on ``num_clients`` POC sites; with ``when``, ``victim``'s processes (the site's client and
    job processes, or with ``job_only`` the job process alone) are SIGKILLed at that moment."""
    from poc_tools import KILL_MOMENTS, kill_site_when

    from nvflare_unlearn.fl import PrivatePocEnv, UnlearningRecipe, run_job
    from nvflare_unlearn.fl.defs import METRICS_FILE
    from nvflare_unlearn.fl.results import find_files

    before = sha256(ckpt)
    label = (when or "none") + ("_job_process" if job_only else "")
    recipe = UnlearningRecipe(
        name=f"unlearn_kill_{label}", initial_ckpt=ckpt, num_clients=num_clients, **DIGITS, **UNLEARN
    )
    fed = recipe.options["federation"]
    env = PrivatePocEnv(num_clients=num_clients)
    thread = kill = None
    if when:
        thread, kill = kill_site_when(victim, when, KILL_MOMENTS[when], job_only=job_only, workspace=env.poc_workspace)
    t0 = time.time()
    entry: dict[str, Any] = {
        "killed": (f"{victim} job process" if job_only else f"{victim} (client + job processes)") if when else None,
        "when": when,
        "num_clients": num_clients,
        "quorum": fed.quorums(num_clients),
        "wait_time_after_min_received": fed.wait_time_after_min_received,
        "task_timeout": fed.task_timeout,
    }
    dest = os.path.join(out, f"kill_{label}")
    try:
        result = run_job(recipe, env, dest)
        entry.update(outcome="completed", status=result.status, job_id=result.job_id)
        metrics = result.metrics
    except RuntimeError as e:
        entry.update(outcome="failed", message=str(e)[:1500])
        hits = find_files(dest, METRICS_FILE) if os.path.isdir(dest) else []
        metrics = json.load(open(hits[0])) if hits else {}
    entry["wall_seconds"] = round(time.time() - t0, 1)
    if thread is not None:
        thread.join(timeout=1)
    if kill is not None and kill.killed_at:
        entry["killed_in"] = {k: kill.progress.get(k) for k in ("phase", "round", "forget_class")}
        entry["pids_killed"] = len(kill.pids)
        if metrics.get("finished_at"):
            entry["seconds_from_kill_to_end"] = round(metrics["finished_at"] - kill.killed_at, 1)
    elif when:
        entry["killed_in"] = None  # the moment never came
    if metrics.get("started_at") and metrics.get("finished_at"):
        entry["job_seconds"] = round(metrics["finished_at"] - metrics["started_at"], 1)
    entry["record_status"] = metrics.get("status")
    entry["error"] = metrics.get("error")
    entry["sites"] = phase_sites(metrics)
    entry["unlearned"] = {k: (metrics.get("unlearned") or {}).get(k) for k in ("u_acc", "r_acc")}
    entry["original_unchanged"] = sha256(ckpt) == before
    say(
        f"kill {when or 'none'}: "
        + json.dumps(
            {
                k: entry.get(k)
                for k in (
                    "outcome",
                    "killed_in",
                    "seconds_from_kill_to_end",
                    "job_seconds",
                    "wall_seconds",
                    "original_unchanged",
                )
            }
        )
    )
    return entry


def route_kill(out: str, ckpt: str) -> dict:
    runs = {"none": kill_run(out, ckpt, None)}
    for when in ("activation", "finetune"):
        runs[when] = kill_run(out, ckpt, when)
    runs["finetune_job_process"] = kill_run(out, ckpt, "finetune", job_only=True)
    return runs


# ------------------------------------------------------------------------------------------------ the document
def render_doc(summary: dict, log_name: str) -> str:
    """The generated part of docs/poc.md: what ran, with which command, and what came out."""
    lines = [
        f"Command: `{summary['command']}` ({summary['machine']}, NVFlare {summary['nvflare']}, {summary['date']}); "
        f"total {summary['seconds']:.0f} s. Console log: `{log_name}`. Every number below is in "
        "`docs/results/poc_summary.json`.",
        "",
        "| route | job | method | NVFlare status | record | rounds | original U / R | pruned U / R | unlearned U / R | "
        "params | sites ran the requested loss | time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ur(d: Optional[dict]) -> str:
        if not d or d.get("u_acc") is None:
            return ""
        return f"{100 * d['u_acc']:.1f} % / {100 * d['r_acc']:.1f} %"

    for route in ("templates", "recipe", "cli", "prod"):
        data = summary["routes"].get(route)
        if not data:
            continue
        if data.get("error"):
            lines.append(f"| {route} | | | **failed** | {data['error'][:150]} | | | | | | | |")
            continue
        pre, unl = data["pretrain"], data["unlearn"]
        acc = f"accuracy {100 * pre['final_acc']:.1f} %" if pre.get("final_acc") is not None else ""
        lines.append(f"| {route} | pretrain | | {pre.get('status')} | {acc} | | | | | | | {pre['seconds']:.0f} s |")
        p = unl.get("params") or [None, None]
        pruned = ur(unl.get("pruned")) if unl.get("method", "prune").startswith("prune") else "no pruning"
        lines.append(
            f"| {route} | unlearn | {unl.get('method', '')} | {unl.get('status')} | {unl.get('record_status')} | "
            f"{unl.get('rounds')} | {ur(unl.get('original'))} | {pruned} | {ur(unl.get('unlearned'))} | "
            f"{p[0]:,} -> {p[1]:,} | {ran_requested(unl.get('objective'))} | {unl['seconds']:.0f} s |"
        )
    kill = summary["routes"].get("kill")
    if kill and not kill.get("error"):
        lines += [
            "",
            "Dead sites (3 POC sites, quorum: every site but one, `wait_time_after_min_received` "
            f"{kill['none']['wait_time_after_min_received']} s, `task_timeout` {kill['none']['task_timeout']} s; "
            "times from the job's record, `finished_at` of the server's workflow; NVFlare sets the job's final status "
            "seconds later):",
            "",
            "| killed (SIGKILL) | killed in | outcome | kill -> end of the workflow | workflow | original unchanged | "
            "sites used per phase |",
            "|---|---|---|---|---|---|---|",
        ]
        for e in kill.values():
            where = e.get("killed_in") or {}
            at = ", ".join(f"{k} {v}" for k, v in where.items() if v is not None) if where else "-"
            sites = "; ".join(
                f"{ph}: {','.join(v.get('used') or v.get('trained') or [])}"
                + (f" (no result: {','.join(v['no_result'])})" if v.get("no_result") else "")
                for ph, v in (e.get("sites") or {}).items()
            )
            found = re.search(r"as (FINISHED:[A-Z_]+)", e.get("message") or "")
            nvflare_status = found.group(1) if found else e.get("status")
            outcome = f"{e['outcome']}: NVFlare {nvflare_status}, record {e.get('record_status')}"
            if e.get("error"):
                outcome += f" ({e['error'][:170]}...)"
            end = f"{e['seconds_from_kill_to_end']:.0f} s" if e.get("seconds_from_kill_to_end") is not None else "-"
            lines.append(
                f"| {e.get('killed') or 'no'} | {at} | {outcome} | {end} | {e.get('job_seconds', '-')} s | "
                f"{'yes' if e.get('original_unchanged') else 'NO'} | {sites} |"
            )
    return "\n".join(lines) + "\n"


def ran_requested(check: Optional[dict]) -> str:
    """The objective check of a job's record in a table cell: the requested loss and the sites that differ."""
    if not check:
        return ""
    differ = check.get("not_as_requested") or []
    ran = ", ".join(f"{s}: {'/'.join(v)}" for s, v in (check.get("sites") or {}).items())
    return f"{check.get('requested')}: {'yes' if not differ else 'NO, ' + ', '.join(differ)} ({ran})"


def write_doc(doc: str, summary: dict, log_name: str) -> None:
    text = open(doc).read()
    start, end = f"<!-- generated:{DOC_BLOCK} -->\n", f"<!-- /generated:{DOC_BLOCK} -->"
    if start not in text or end not in text:
        raise SystemExit(f"{doc} has no generated block {DOC_BLOCK!r}")
    head, rest = text.split(start, 1)
    _old, tail = rest.split(end, 1)
    with open(doc + ".tmp", "w") as f:
        f.write(head + start + render_doc(summary, log_name) + end + tail)
    os.replace(doc + ".tmp", doc)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(REPO, "runs", f"poc-{time.strftime('%Y%m%d-%H%M%S')}"))
    p.add_argument("--routes", default=",".join(ROUTES), help=f"comma-separated, from {','.join(ROUTES)}")
    p.add_argument("--templates", default=os.path.join(REPO, "job_templates"))
    p.add_argument("--timeout", type=float, default=900, help="seconds to wait for each template job")
    p.add_argument("--ckpt", default=None, help="kill route alone: the trained model (default: pretrain one in POC)")
    p.add_argument("--doc", default=None, help="regenerate this docs/poc.md from the run (and docs/results/poc_*)")
    p.add_argument("--render", default=None, help="only regenerate --doc from this poc_summary.json (no run)")
    a = p.parse_args(argv)
    if a.render:
        with open(a.render) as f:
            write_doc(a.doc or os.path.join(REPO, "docs", "poc.md"), json.load(f), "docs/results/poc_run.log")
        return 0
    routes = [r for r in a.routes.split(",") if r]
    unknown = sorted(set(routes) - set(ROUTES))
    if unknown:
        p.error(f"unknown route(s) {unknown}; routes are {list(ROUTES)}")
    out = os.path.abspath(a.out)
    if os.path.exists(out) and os.listdir(out):
        print(f"error: --out {out} exists and is not empty: every run writes to a new folder", file=sys.stderr)
        return 2
    os.makedirs(out, exist_ok=True)
    import platform

    import nvflare

    started = time.time()
    summary: dict[str, Any] = {
        "command": "python poc/run_poc.py"
        + (f" --routes {a.routes}" if a.routes != ",".join(ROUTES) else "")
        + (" --doc docs/poc.md" if a.doc else ""),
        "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, Python {platform.python_version()}",
        "nvflare": nvflare.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "routes": {},
    }
    ckpt = os.path.abspath(a.ckpt) if a.ckpt else None
    for route in routes:
        folder = os.path.join(out, route)
        say(f"=== route {route}")
        try:
            if route == "templates":
                summary["routes"][route] = route_templates(folder, a.templates, a.timeout)
            elif route == "recipe":
                summary["routes"][route] = data = route_recipe(folder)
                ckpt = data["checkpoint"]
                data["checkpoint"] = os.path.relpath(ckpt, out)
            elif route == "cli":
                summary["routes"][route] = route_cli(folder, ["--env", "poc"], "cli")
            elif route == "prod":
                summary["routes"][route] = route_prod(folder)
            elif route == "kill":
                if ckpt is None:
                    from nvflare_unlearn.fl import PretrainRecipe, PrivatePocEnv, run_job

                    pre = PretrainRecipe(name="pretrain_digits", num_clients=2, **DIGITS, **PRETRAIN)
                    res = run_job(pre, PrivatePocEnv(num_clients=2), os.path.join(folder, "pretrain"))
                    ckpt = os.path.join(folder, "pretrained_model.pt")
                    shutil.copy2(res.model_path, ckpt)
                summary["routes"][route] = route_kill(folder, ckpt)
        except Exception as e:  # a failed route is a result too: written down, and the exit code says so
            say(f"route {route} FAILED: {e}")
            traceback.print_exc()
            summary["routes"][route] = {"error": str(e)[:2000]}
    summary["seconds"] = round(time.time() - started, 1)
    with open(os.path.join(out, "poc_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(out, "poc_run.log"), "w") as f:
        f.write("\n".join(_LOG) + "\n")
    if a.doc:
        results = os.path.join(os.path.dirname(os.path.abspath(a.doc)), "results")
        os.makedirs(results, exist_ok=True)
        shutil.copy2(os.path.join(out, "poc_summary.json"), os.path.join(results, "poc_summary.json"))
        shutil.copy2(os.path.join(out, "poc_run.log"), os.path.join(results, "poc_run.log"))
        write_doc(a.doc, summary, "docs/results/poc_run.log")
        say(f"regenerated {a.doc} from this run")
    failed = [r for r, v in summary["routes"].items() if v.get("error")]
    say(f"done in {summary['seconds']:.0f} s; failed routes: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
