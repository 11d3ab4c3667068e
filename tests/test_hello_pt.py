"""A hello-pt-shaped NVFlare Client API script (docs/examples/hello_pt) unlearned with a few-line patch (issue 25).

- the patch applies to the NVIDIA-style script, and its changed lines stay few;
- ``SiteLoop`` answers the plugin's tasks itself, so the script's ``flare.is_evaluate()`` branch (first, as in
  NVIDIA's hello-pt) never sees the plugin's ``validate``: checked against the task names NVFlare's
  ``ClientAPIExecutor`` gives ``is_evaluate`` / ``is_train``, with the patched script driven task by task;
- the traps fail loudly: an optimizer built once at the top (a silent no-op otherwise), the unpatched script;
- sim: the patched script runs the unlearning job in the simulator, digit 3 is forgotten and R kept.
"""

from __future__ import annotations

import copy
import inspect
import json
import runpy
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.executors.client_api_executor import ClientAPIExecutor

from nvflare_unlearn import apply_pruning_plan, build_model, build_pruning_plan
from nvflare_unlearn.fl.defs import (
    META_FORGET,
    META_METHOD,
    META_OBJECTIVE_APPLIED,
    META_PLAN,
    META_PRIVACY_APPLIED,
    META_VERIFY,
    METRIC_CORRECT,
    METRIC_TOTAL,
    TASK_ACTIVATIONS,
    TASK_TRAIN,
    TASK_VALIDATE,
    TASK_VERIFY,
    TEACHER_PREFIX,
)
from nvflare_unlearn.fl.model_state import state_to_numpy
from nvflare_unlearn.fl.site_loop import PLUGIN_TASKS, SiteLoop

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "docs" / "examples" / "hello_pt"
PATCH = EXAMPLE / "unlearning.patch"
EXECUTOR_DEFAULTS = inspect.signature(ClientAPIExecutor.__init__).parameters


class FakeFlare(types.ModuleType):
    """``nvflare.client`` as a script sees it, fed a list of (task name, FLModel). ``is_evaluate`` / ``is_train``
    decide as NVFlare's in-process API does: the task name against the ``ClientAPIExecutor``'s configured names
    (its defaults, which the plugin's ``ScriptRunner`` keeps)."""

    FLModel = FLModel

    def __init__(self, tasks: list[tuple[str, FLModel]], site: str = "site-1"):
        super().__init__("nvflare.client")
        self.tasks, self.site, self.current, self.sent = list(tasks), site, None, []
        self.train_task = EXECUTOR_DEFAULTS["train_task_name"].default
        self.eval_task = EXECUTOR_DEFAULTS["evaluate_task_name"].default

    def init(self):
        pass

    def system_info(self):
        return {"site_name": self.site}

    def get_site_name(self):
        return self.site

    def is_running(self):
        if self.current is None and self.tasks:
            self.current = self.tasks.pop(0)
        return self.current is not None

    def receive(self):
        return self.current[1] if self.is_running() else None

    def get_task_name(self):
        return self.current[0]

    def is_evaluate(self):
        return self.current[0] == self.eval_task

    def is_train(self):
        return self.current[0] == self.train_task

    def send(self, model: FLModel):
        self.sent.append((self.current[0], model))
        self.current = None


def patched_example(folder: Path) -> Path:
    """The NVIDIA-style example copied to ``folder`` with unlearning.patch applied (``git apply``)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("client.py", "model.py", "unlearn.py"):
        shutil.copy(EXAMPLE / name, folder / name)
    out = subprocess.run(["git", "apply", "-p1", str(PATCH)], cwd=folder, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return folder


@pytest.fixture
def patched(tmp_path, monkeypatch):
    """The patched example's folder, importable (``from model import DigitsNet``) for the test's duration."""
    folder = patched_example(tmp_path / "hello_pt")
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "model", raising=False)
    yield folder
    sys.modules.pop("model", None)


def run_script(script: Path, flare: FakeFlare, monkeypatch, *args: str) -> None:
    """Run ``script`` as ``__main__`` with ``flare`` standing in for ``nvflare.client``."""
    import nvflare

    monkeypatch.setitem(sys.modules, "nvflare.client", flare)
    monkeypatch.setattr(nvflare, "client", flare, raising=False)
    monkeypatch.setattr(sys, "argv", [str(script), *args])
    runpy.run_path(str(script), run_name="__main__")


def unlearning_tasks(net_cls, forget: int = 3) -> list[tuple[str, FLModel]]:
    """The tasks an unlearning job sends a site, as the controller builds them: a pruned model (its plan in the
    meta), the default method (NegGrad+ with distillation: the original model travels as the teacher)."""
    torch.manual_seed(0)
    original = build_model(net_cls, 10)  # the factory, as the server builds it
    teacher = {TEACHER_PREFIX + k: v for k, v in state_to_numpy(original).items()}
    rng = np.random.default_rng(0)
    scores = {n: rng.random(m.out_channels) for n, m in original.named_modules() if isinstance(m, torch.nn.Conv2d)}
    plan = build_pruning_plan(original, scores, 0.3, forget_class=forget)
    pruned = apply_pruning_plan(copy.deepcopy(original), plan)
    base = {META_PLAN: plan.to_json(), META_FORGET: [forget]}
    method = {"method": "neggrad", "recovery": "kd"}

    def task(name, meta, teacher_too=False):
        params = {**state_to_numpy(pruned), **(teacher if teacher_too else {})}
        return name, FLModel(params=params, meta={**base, **meta}, current_round=0)

    return [
        task(TASK_ACTIVATIONS, {}),
        task(TASK_TRAIN, {META_METHOD: method}, teacher_too=True),
        task(TASK_VALIDATE, {}),
        task(TASK_VERIFY, {META_VERIFY: {"round": "stats"}}),
    ]


# ------------------------------------------------------------------------------------------------ the patch
def test_the_patch_applies_and_changes_few_lines(tmp_path):
    changed = [
        line for line in PATCH.read_text().splitlines() if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    added = sum(line.startswith("+") for line in changed)
    assert added <= 12 and len(changed) - added <= 10, f"the patch grew: +{added} / -{len(changed) - added}"
    folder = patched_example(tmp_path / "hp")
    text = (folder / "client.py").read_text()
    assert "site.is_running()" in text and "flare.is_evaluate()" in text  # NVIDIA's branch is still there, first
    assert text.index("flare.is_evaluate()") < text.index("site.retained(")


def test_nvflares_is_evaluate_would_catch_the_plugins_validate_task():
    """Why the guard exists: NVFlare's ClientAPIExecutor names the evaluate task 'validate', the plugin's task."""
    assert EXECUTOR_DEFAULTS["evaluate_task_name"].default == TASK_VALIDATE
    assert EXECUTOR_DEFAULTS["train_task_name"].default == TASK_TRAIN
    assert set(PLUGIN_TASKS) == {TASK_ACTIVATIONS, TASK_VALIDATE, TASK_VERIFY}


# ------------------------------------------------------------------------------------------------ the guard
def test_site_loop_returns_to_the_users_branches_only_for_train(patched):
    from model import DigitsNet

    tasks = unlearning_tasks(DigitsNet)
    flare = FakeFlare(tasks)
    data = torch.utils.data.TensorDataset(torch.rand(40, 1, 8, 8), torch.arange(40) % 10)
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    site = SiteLoop(DigitsNet, 10, loader, loader, optimizer=lambda net: torch.optim.SGD(net.parameters(), lr=0.01),
                    flare=flare)  # fmt: skip
    seen = []
    while site.is_running():
        flare.receive()
        seen.append((flare.get_task_name(), flare.is_evaluate(), flare.is_train()))
        for x, y in site.retained(loader):
            site.optimizer.zero_grad()
            site.loss(site.model(x), y).backward()
            site.optimizer.step()
        flare.send(site.result(site.model))
    assert seen == [(TASK_TRAIN, False, True)]  # validate, activations, verify never reached the user's code
    assert [t for t, _ in flare.sent] == [TASK_ACTIVATIONS, TASK_TRAIN, TASK_VALIDATE, TASK_VERIFY]


def test_the_patched_hello_pt_script_answers_every_task_the_plugins_way(patched, monkeypatch):
    """The patched NVIDIA-style script, its is_evaluate() branch first, driven through an unlearning job's tasks."""
    from model import DigitsNet

    tasks = unlearning_tasks(DigitsNet)
    pruned_shapes = {k: v.shape for k, v in tasks[0][1].params.items()}
    flare = FakeFlare(tasks)
    run_script(patched / "client.py", flare, monkeypatch, "--epochs", "1")
    answers = dict(flare.sent)
    assert list(answers) == [TASK_ACTIVATIONS, TASK_TRAIN, TASK_VALIDATE, TASK_VERIFY]
    assert META_PRIVACY_APPLIED in answers[TASK_ACTIVATIONS].meta  # the plugin's own activation report
    validate = answers[TASK_VALIDATE]
    assert sum(validate.metrics[METRIC_TOTAL]) == 450 and len(validate.metrics[METRIC_CORRECT]) == 10
    assert "accuracy" not in (validate.metrics or {})  # not the script's is_evaluate() answer
    assert answers[TASK_VERIFY].params  # the forgetting check's aggregates
    train = answers[TASK_TRAIN]
    assert {k: v.shape for k, v in train.params.items()} == pruned_shapes  # the pruned model, numpy
    applied = train.meta[META_OBJECTIVE_APPLIED]
    assert applied["loss"] != "ce" and applied["steps"] > 0 and applied["forget_steps"] > 0  # NegGrad+ with KD ran
    n_train = 1347
    assert 0 < train.meta["NUM_STEPS_CURRENT_ROUND"] < n_train  # the retained samples: digit 3 dropped


# ------------------------------------------------------------------------------------------------ the traps
def test_an_optimizer_built_once_at_the_top_fails_loudly(patched, monkeypatch):
    """The patch without its optimizer line: the script steps the optimizer built at the top, whose parameters are
    last round's (a silent no-op on the new model). SiteLoop refuses to send that round."""
    client = patched / "client.py"
    text = client.read_text()
    once = text.replace("model, optimizer = site.model, site.optimizer", "model = site.model")
    assert once != text
    client.write_text(once)
    from model import DigitsNet

    flare = FakeFlare([t for t in unlearning_tasks(DigitsNet) if t[0] == TASK_TRAIN])
    with pytest.raises(RuntimeError, match="site.optimizer never stepped.*built once"):
        run_script(client, flare, monkeypatch, "--epochs", "1")
    assert flare.sent == []  # nothing went to the server


def test_the_unpatched_script_fails_loudly_on_the_plugins_tasks(tmp_path, monkeypatch):
    """NVIDIA's script as it is, under the plugin's tasks: it stops at the first one with an error (the plugin's
    NUMPY exchange sends numpy weights, which its load_state_dict refuses); it answers nothing."""
    folder = tmp_path / "plain"
    folder.mkdir()
    for name in ("client.py", "model.py"):
        shutil.copy(EXAMPLE / name, folder / name)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "model", raising=False)
    from model import DigitsNet  # the unpatched model: no num_classes

    params = state_to_numpy(DigitsNet())
    tasks = [(name, FLModel(params=dict(params), meta={META_FORGET: [3]})) for name in PLUGIN_TASKS]
    flare = FakeFlare(tasks)
    with pytest.raises(RuntimeError, match="numpy"):
        run_script(folder / "client.py", flare, monkeypatch, "--epochs", "1")
    assert flare.sent == []
    sys.modules.pop("model", None)


def test_site_loop_refuses_an_optimizer_instead_of_a_factory():
    net = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match="takes a factory"):
        SiteLoop("small_cnn", 10, [], [], optimizer=torch.optim.SGD(net.parameters(), lr=0.1), flare=FakeFlare([]))


# ------------------------------------------------------------------------------------------------ simulator
def pretrain(folder: Path, path: Path, epochs: int = 12) -> Path:
    """The team's trained model, quickly: the example's network trained on all digits in this process (stands in
    for job.py's FedAvg run), saved as NVFlare's FL_global_model.pt is ({"model": state_dict})."""
    with pytest.MonkeyPatch.context() as mp:  # the example's folder importable, as its scripts have it
        mp.syspath_prepend(str(folder))
        client = runpy.run_path(str(folder / "client.py"), run_name="hello_pt_client")
        from model import DigitsNet
    train, _test = client["load_data"]()
    torch.manual_seed(0)
    net = DigitsNet()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    loader = torch.utils.data.DataLoader(train, batch_size=32, shuffle=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny CNN: more threads only contend on a loaded machine
    try:
        for _ in range(epochs):
            for x, y in loader:
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(net(x), y).backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    torch.save({"model": net.state_dict()}, path)
    return path


@pytest.mark.sim
@pytest.mark.timeout(400)
def test_the_patched_hello_pt_script_unlearns_a_digit_in_the_simulator(tmp_path):
    folder = patched_example(tmp_path / "hello_pt")
    ckpt = pretrain(folder, tmp_path / "FL_global_model.pt")
    sys.modules.pop("model", None)
    summary = tmp_path / "summary.json"
    started = time.time()
    out = subprocess.run(
        [sys.executable, str(folder / "unlearn.py"), "--initial-ckpt", str(ckpt), "--workspace", str(tmp_path / "ws"),
         "--summary", str(summary)],
        cwd=str(tmp_path), capture_output=True, text=True, timeout=360,
    )  # fmt: skip
    print(out.stdout[-1500:], f"\n{time.time() - started:.0f} s")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-4000:]
    s = json.loads(summary.read_text())
    orig, final = s["original"], s["unlearned"]
    assert orig["u_acc"] > 0.8, "the trained model must know digit 3 before it can forget it"
    assert final["u_acc"] <= 0.05 and final["r_acc"] >= orig["r_acc"] - 0.05, s
    assert s["objective"]["not_as_requested"] == [], s["objective"]  # every site ran the requested method
    assert s["ok"] and "unlearned: U (forgotten)" in out.stdout


def test_a_site_holding_only_forget_classes_is_left_out_of_the_average(patched):
    from model import DigitsNet

    flare = FakeFlare([t for t in unlearning_tasks(DigitsNet) if t[0] == TASK_TRAIN])
    only_threes = torch.utils.data.TensorDataset(torch.rand(16, 1, 8, 8), torch.full((16,), 3))
    loader = torch.utils.data.DataLoader(only_threes, batch_size=8)
    site = SiteLoop(DigitsNet, 10, loader, loader, optimizer=lambda net: torch.optim.SGD(net.parameters(), lr=0.01),
                    flare=flare)  # fmt: skip
    assert site.is_running()
    assert list(site.retained(loader)) == []
    sent = site.result(site.model)
    assert sent.meta["NUM_STEPS_CURRENT_ROUND"] == 0 and META_OBJECTIVE_APPLIED not in sent.meta
