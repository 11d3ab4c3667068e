"""Real local NVFlare POC systems (slow): pretrain + unlearn through ``PrivatePocEnv`` via the recipe and via the CLI
(each job provisions, starts and stops a POC system of its own, in a private workspace on free ports), the
production route (a POC system on NVFlare's default workspace and ports: run these alone), the unlearning job with a
site killed (SIGKILL) during fine-tuning, and a POC run beside a process that names its workspace. The same code
writes docs/poc.md (``poc/run_poc.py``); the fast tests check that page against the committed run and how a POC
system's processes are followed and ended."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import run_poc  # poc/run_poc.py (poc/ is on pytest's pythonpath): the routes docs/poc.md is generated from

REPO = Path(__file__).resolve().parents[1]

slow_poc = [pytest.mark.slow, pytest.mark.timeout(1800)]


def _check_unlearned(summary: dict, method: str = "prune") -> None:
    """The job completed, forgot digit 3 and kept the rest, with ``method``; every site ran the requested loss."""
    assert summary["status"] == "FINISHED:COMPLETED" and summary["record_status"] == "completed"
    assert summary["rounds"] == run_poc.UNLEARN["num_rounds"]
    assert summary["original"]["u_acc"] > 0.5 and summary["unlearned"]["u_acc"] <= 0.05
    assert summary["unlearned"]["r_acc"] > 0.85
    assert summary["method"] == method
    if method == "prune":
        assert summary["params"][1] < summary["params"][0]
    else:  # the default (NegGrad+ with distillation) changes weights, not the architecture
        assert summary["params"][1] == summary["params"][0]
    check = summary["objective"]
    assert check["not_as_requested"] == [] and set(check["sites"]) == {"site-1", "site-2"}, check
    assert all(ran == [check["requested"]] for ran in check["sites"].values()), check


@pytest.fixture(scope="module")
def recipe_route(tmp_path_factory):
    return run_poc.route_recipe(str(tmp_path_factory.mktemp("poc_recipe")))


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_pretrain_and_unlearn_in_poc_via_the_recipe(recipe_route):
    assert recipe_route["pretrain"]["status"] == "FINISHED:COMPLETED"
    assert recipe_route["pretrain"]["final_acc"] > 0.85
    _check_unlearned(recipe_route["unlearn"])
    assert recipe_route["original_unchanged"]
    sites = recipe_route["unlearn"]["sites"]
    assert all(v.get("no_result") == [] for v in sites.values()), sites


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_pretrain_and_unlearn_in_poc_via_the_cli(tmp_path):
    got = run_poc.route_cli(str(tmp_path), ["--env", "poc"], "cli")
    assert got["pretrain"]["status"] == "FINISHED:COMPLETED"
    _check_unlearned(got["unlearn"], method="neggrad+kd")  # no method flag: the job's default
    assert got["original_unchanged"]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_cli_runs_in_production_through_an_admin_startup_kit(tmp_path):
    """--env prod (NVFlare's ProdEnv) against a running system: a POC system started by hand stands in for a
    deployment; the package is installed and allow-listed on its sites, no code travels in the job."""
    got = run_poc.route_prod(str(tmp_path))
    assert got["pretrain"]["status"] == "FINISHED:COMPLETED"
    _check_unlearned(got["unlearn"], method="neggrad+kd")
    (result,) = (tmp_path / "unlearn" / "workspace" / "result").iterdir()
    assert not list(result.rglob("custom/nvflare_unlearn")), "the production route must not carry the package"


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_killed_site_costs_a_bounded_delay_and_the_job_says_so(recipe_route, tmp_path):
    """site-3's client and job processes are SIGKILLed in fine-tuning round 2 of a 3-site job. The workflow goes on
    with the other two (quorum: all sites but one) and records which sites trained each round; every remaining task
    waits at most wait_time_after_min_received for the dead site, so the job ends within a bound. NVFlare then
    finishes the job as FINISHED:ABNORMAL (the dead site has no outcome), which is reported as a failure naming the
    site, with the outputs kept."""
    ckpt = str(Path(recipe_route["checkpoint"]))
    entry = run_poc.kill_run(str(tmp_path), ckpt, "finetune")
    assert entry["killed_in"] and entry["killed_in"]["phase"] == "finetune", entry
    assert entry["record_status"] == "completed", entry  # the workflow finished with the remaining sites
    assert entry["outcome"] == "failed" and "FINISHED:ABNORMAL" in entry["message"], entry
    assert "['site-3'] gave no result" in entry["message"], entry["message"]
    assert entry["original_unchanged"]
    rounds = {k: v for k, v in entry["sites"].items() if k.startswith("finetune")}
    assert rounds["finetune round 3"]["trained"] == ["site-1", "site-2"]
    assert "site-3" in rounds["finetune round 3"]["no_result"]
    # bound: rounds 2 and 3 (train + validate each) after the kill, each waiting at most W for the dead site, on top
    # of the undisturbed job's own work, with slack for a loaded 2-core machine
    bound = 4 * entry["wait_time_after_min_received"] + 120
    assert entry["seconds_from_kill_to_end"] <= bound, entry


def test_docs_poc_page_is_generated_from_the_committed_run():
    summary = json.loads((REPO / "docs" / "results" / "poc_summary.json").read_text())
    text = (REPO / "docs" / "poc.md").read_text()
    start, end = f"<!-- generated:{run_poc.DOC_BLOCK} -->\n", f"<!-- /generated:{run_poc.DOC_BLOCK} -->"
    block = text.split(start, 1)[1].split(end, 1)[0]
    assert block == run_poc.render_doc(summary, "docs/results/poc_run.log"), (
        "docs/poc.md differs from docs/results/poc_summary.json: run python poc/run_poc.py --doc docs/poc.md"
    )
    log = (REPO / "docs" / "results" / "poc_run.log").read_text()
    assert summary["date"] and "=== route" in log
    # the committed run: the CLI routes ran the job's default, the others the paper's pruning, and in every route
    # each site reported the loss the job asked for
    routes = summary["routes"]
    methods = {r: routes[r]["unlearn"]["method"] for r in ("templates", "recipe", "cli", "prod")}
    assert methods == {"templates": "prune", "recipe": "prune", "cli": "neggrad+kd", "prod": "neggrad+kd"}, methods
    for r in methods:
        assert routes[r]["unlearn"]["objective"]["not_as_requested"] == [], routes[r]["unlearn"]["objective"]


# ------------------------------------------------------------------------------------ a POC system beside others
def _sleeper(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", *args])


def test_the_tracker_ends_the_processes_it_follows_and_their_descendants_only(tmp_path):
    """A supervisor we started, with a child and a grandchild that left its session (as NVFlare's job processes
    do), is ended whole; a process with the same command line that we did not start is left alive."""
    from nvflare_unlearn.fl.processes import ProcessTracker

    marker = str(tmp_path / "ws")
    script = tmp_path / "parent.py"  # a child in a new session, as NVFlare's job processes are
    script.write_text(
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)', {marker!r}],"
        " start_new_session=True)\n"
        "time.sleep(600)\n"
    )
    root = subprocess.Popen(["bash", "-c", f"{sys.executable} {script} & sleep 600; wait"], start_new_session=True)
    other = _sleeper(marker)
    try:
        tracker = ProcessTracker(interval=0.2)
        tracker.add(root.pid)
        deadline = time.time() + 20
        while len(tracker.alive()) < 4 and time.time() < deadline:  # bash, python, its child, sleep
            time.sleep(0.2)
        followed = tracker.alive()
        assert root.pid in followed and len(followed) >= 4, followed
        ended = tracker.end(wait_s=0)
        assert set(followed) <= set(ended) and other.pid not in ended
        root.wait(timeout=10)
        assert other.poll() is None, "a process we did not start was ended"
        assert not [p for p in followed if os.path.exists(f"/proc/{p}") and _state(p) != "Z"], (
            "a followed process lives"
        )
    finally:
        other.kill()
        root.kill()


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def test_each_private_poc_env_has_its_own_workspace_and_ports(tmp_path):
    from nvflare_unlearn.fl import PrivatePocEnv
    from nvflare_unlearn.fl.poc import free_ports

    a, b = PrivatePocEnv(num_clients=2), PrivatePocEnv(num_clients=2)
    assert a.poc_workspace != b.poc_workspace and a.own_workspace and not os.path.exists(a.poc_workspace)
    given = PrivatePocEnv(num_clients=3, workspace=str(tmp_path / "ws"), ports=(18002, 18003))
    assert given.poc_workspace == os.path.realpath(tmp_path / "ws") and not given.own_workspace
    assert given.ports == (18002, 18003) and given.stop() == []  # nothing started, nothing stopped
    ports = free_ports(2)
    assert len(set(ports)) == 2 and all(p > 0 for p in ports)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_poc_run_beside_others_ends_only_its_own_processes(tmp_path):
    """Issue 25: a process that names the workspace in its command line survives the run; a system that this
    environment did not start is never stopped (deploy refuses); nothing of the run is left behind."""
    from nvflare_unlearn.fl import PretrainRecipe, PrivatePocEnv, run_job
    from nvflare_unlearn.fl.processes import poc_processes

    ws = str(tmp_path / "ws")
    bystander = _sleeper(ws)
    try:
        first = PrivatePocEnv(num_clients=2, workspace=ws)
        recipe = PretrainRecipe(name="pretrain_beside", num_clients=2, **run_poc.DIGITS, num_rounds=1, lr=0.05)
        result = run_job(recipe, first, str(tmp_path / "out"))
        assert result.status == "FINISHED:COMPLETED"
        assert bystander.poll() is None, "the run ended a process it did not start"
        assert poc_processes(os.path.realpath(ws)) == [bystander.pid], "the run left processes behind"
        # a system someone else started in that workspace: a second environment refuses, and leaves it running
        other = PrivatePocEnv(num_clients=2, workspace=ws)
        other._provision()
        other._start_services()
        try:
            from nvflare_unlearn.fl.poc import system_running, wait_for_sites

            wait_for_sites(other, 2, 300)
            with pytest.raises(RuntimeError, match="did not start"):
                recipe.run(PrivatePocEnv(num_clients=2, workspace=ws))
            assert system_running(ws) and other.tracker.alive()
        finally:
            other.stop()
        assert poc_processes(os.path.realpath(ws)) == [bystander.pid]
    finally:
        bystander.kill()
