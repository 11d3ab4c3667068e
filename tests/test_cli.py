"""The ``nvflare-unlearn`` command: clear errors (exit 2), failed jobs (exit 1), and the demo's outputs."""

from __future__ import annotations

import json
import os

import pytest
import torch

from nvflare_unlearn import build_model, save_checkpoint
from nvflare_unlearn.cli import main


def _err(capsys) -> str:
    return capsys.readouterr().err


def test_bad_class_list_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--out", str(tmp_path / "o"), "--forget-classes", "three"])
    assert e.value.code == 2
    assert "class ids are integers" in _err(capsys)


@pytest.mark.parametrize("ratio", ["0", "1", "1.5", "-0.1"])
def test_ratio_outside_open_interval_is_refused(tmp_path, capsys, ratio):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--out", str(tmp_path / "o"), "--prune-ratio", ratio])
    assert e.value.code == 2
    assert "(0, 1)" in _err(capsys)


def test_non_empty_out_dir_is_refused(tmp_path, capsys):
    (tmp_path / "old_report.json").write_text("{}")
    assert main(["demo", "--out", str(tmp_path)]) == 2
    assert "not empty" in _err(capsys)
    assert (tmp_path / "old_report.json").read_text() == "{}"


def test_missing_checkpoint(tmp_path, capsys):
    code = main(["unlearn", "--ckpt", str(tmp_path / "nope.pt"), "--forget-classes", "3", "--out", str(tmp_path / "o")])
    err = _err(capsys)
    assert code == 2
    assert "nope.pt" in err and "does not exist" in err


def test_unknown_forget_class(tmp_path, capsys):
    ckpt = tmp_path / "m.pt"
    save_checkpoint(str(ckpt), build_model("small_cnn", 10, in_channels=1), None, "small_cnn", 10)
    code = main(["unlearn", "--ckpt", str(ckpt), "--forget-classes", "12", "--out", str(tmp_path / "o")])
    err = _err(capsys)
    assert code == 2
    assert "forget class 12" in err


def test_evaluate_reports_u_and_r_accuracy(tmp_path, capsys):
    ckpt = tmp_path / "m.pt"
    torch.manual_seed(0)
    save_checkpoint(str(ckpt), build_model("small_cnn", 10, in_channels=1), None, "small_cnn", 10)
    assert main(["evaluate", "--ckpt", str(ckpt), "--forget-classes", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["forget_classes"] == [3] and 0.0 <= out["u_acc"] <= 1.0 and 0.0 <= out["r_acc"] <= 1.0


def test_corrupt_checkpoint_is_refused_before_the_job(tmp_path, capsys):
    ckpt = tmp_path / "corrupt.pt"
    ckpt.write_bytes(b"this is not a torch checkpoint")
    code = main(["unlearn", "--ckpt", str(ckpt), "--forget-classes", "3", "--out", str(tmp_path / "o")])
    err = _err(capsys)
    assert code == 2
    assert "not a readable checkpoint" in err and "Traceback" not in err
    assert ckpt.read_bytes() == b"this is not a torch checkpoint"


@pytest.mark.sim
def test_failed_job_exits_non_zero(tmp_path, capsys):
    """Every site fails (its data folder is missing): the simulator may exit 0, the CLI must not."""
    ckpt = tmp_path / "m.pt"
    save_checkpoint(str(ckpt), build_model("small_cnn", 10, in_channels=3), None, "small_cnn", 10)
    before = ckpt.read_bytes()
    out = tmp_path / "run"
    code = main(
        [
            "unlearn",
            "--ckpt",
            str(ckpt),
            "--forget-classes",
            "3",
            "--num-rounds",
            "1",
            "--in-channels",
            "3",
            "--dataset",
            "cifar10",
            "--data-root",
            str(tmp_path / "no_such_data"),
            "--out",
            str(out),
        ]
    )
    err = _err(capsys)
    assert code == 1
    assert "failed" in err
    assert not (out / "report.json").exists()
    assert ckpt.read_bytes() == before


@pytest.mark.slow
def test_demo_writes_report_and_plot(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["forget_classes"] == [3]
    for stage in ("original", "pruned", "unlearned"):
        assert 0.0 <= report[stage]["u_acc"] <= 1.0 and 0.0 <= report[stage]["r_acc"] <= 1.0
    assert report["unlearned"]["u_acc"] <= 0.05
    assert report["unlearned"]["r_acc"] >= report["original"]["r_acc"] - 0.03
    assert report["params_after"] < report["params_before"] and report["rounds"] == 3
    assert (out / "u_r_accuracy.png").stat().st_size > 10_000
    assert os.path.isfile(out / "unlearned_model.pt") and os.path.isfile(out / "pruning_plan.json")


def test_deprecated_flags_still_work_with_a_warning(tmp_path, capsys):
    """Version 0.1's flags (--forget, --ratio, --rounds, --sites) are accepted for one release and say so."""
    ckpt = tmp_path / "m.pt"
    save_checkpoint(str(ckpt), build_model("small_cnn", 10, in_channels=1), None, "small_cnn", 10)
    assert main(["evaluate", "--ckpt", str(ckpt), "--forget", "3"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["forget_classes"] == [3]
    assert "--forget is deprecated, use --forget-classes" in captured.err
    out = tmp_path / "job"
    code = main(["export", "--job", "retrain", "--forget", "3", "--sites", "3", "--rounds", "2", "--out", str(out)])
    assert code == 0
    err = capsys.readouterr().err
    assert "--sites is deprecated" in err and "--rounds is deprecated" in err
    server = json.loads((out / "retrain" / "app" / "config" / "config_fed_server.json").read_text())
    assert server["workflows"][0]["args"]["federation"]["num_rounds"] == 2
    assert server["workflows"][0]["args"]["federation"]["min_clients"] == 2  # default quorum: all sites but one


def test_option_flags_are_the_option_names(capsys):
    """Every option field has a flag of the same name (prune_ratio -> --prune-ratio) with its help text."""
    from nvflare_unlearn.options import FederationOptions
    from nvflare_unlearn.unlearning import JOB_GROUPS as GROUPS

    with pytest.raises(SystemExit):
        main(["unlearn", "--help"])
    help_text = capsys.readouterr().out
    for group in GROUPS:
        for name in group.names():
            assert "--" + name.replace("_", "-") in help_text, name
    assert FederationOptions.help("stop_cond").split(",")[0] in " ".join(help_text.split())


# ------------------------------------------------------------------------------------ the user's own code (issue 25)
_USER_NET = """import torch.nn as nn


def build_net(num_classes=10):
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, num_classes))


build_net.input_shape = (1, 8, 8)
"""


@pytest.fixture
def user_folder(tmp_path, monkeypatch):
    """A user's project folder as the working directory: a model module (a fresh name per test) and a script; the
    interpreter's import state is restored afterwards."""
    import sys

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    name = f"user_net_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(_USER_NET)
    (tmp_path / "client.py").write_text("print('my Client API script')\n")
    yield tmp_path, name
    sys.modules.pop(name, None)


def test_unlearn_help_shows_the_script_flags(capsys):
    with pytest.raises(SystemExit):
        main(["unlearn", "--help"])
    help_text = capsys.readouterr().out
    for flag in ("--train-script", "--train-args", "--path", "-v, --verbose"):
        assert flag in help_text, flag


def test_train_script_and_model_from_the_working_directory_go_into_the_job(user_folder):
    """`--model mod:factory` imports from the working directory (no PYTHONPATH=.), `--train-script` / `--train-args`
    reach the recipe, and the exported job carries the script and the model module."""
    folder, name = user_folder
    code = main(
        ["export", "--job", "unlearn", "--ckpt", "m.pt", "--forget-classes", "3", "--model", f"{name}:build_net"]
        + ["--train-script", "client.py", "--train-args", "--epochs 2 --lr 0.1", "--out", "job"]
    )
    assert code == 0
    app = folder / "job" / "unlearn" / "app"
    client = json.loads((app / "config" / "config_fed_client.json").read_text())
    args = client["executors"][0]["executor"]["args"]
    assert client["executors"][0]["executor"]["path"].endswith("ClientAPIExecutor")
    assert args["task_script_path"] == "client.py" and args["task_script_args"] == "--epochs 2 --lr 0.1"
    assert (app / "custom" / "client.py").is_file() and (app / "custom" / f"{name}.py").is_file()


def test_path_flag_finds_a_model_module_elsewhere(user_folder, capsys):
    folder, name = user_folder
    (folder / "src").mkdir()
    (folder / f"{name}.py").rename(folder / "src" / f"{name}.py")
    argv = ["export", "--job", "pretrain", "--model", f"{name}:build_net", "--out"]
    assert main(argv + ["job_a"]) == 2
    err = _err(capsys)
    assert f"cannot import module {name!r}" in err and "--path" in err
    assert main(argv + ["job_b", "--path", "src"]) == 0


def test_errors_name_the_cli_flags_not_python_arguments(user_folder, capsys):

    folder, name = user_folder
    with pytest.MonkeyPatch.context() as mp:  # the user's own script made the checkpoint, importing its module
        mp.syspath_prepend(str(folder))
        save_checkpoint(str(folder / "m.pt"), build_model(f"{name}:build_net", 10), None, f"{name}:build_net", 10)
    assert main(["evaluate", "--ckpt", "m.pt"]) == 2
    err = _err(capsys)
    assert f"--model {name}:build_net" in err and f"--allow-import {name}" in err
    assert "model_name=" not in err and "allow_import=" not in err
    assert main(["evaluate", "--ckpt", "m.pt", "--allow-import", name]) == 0
    capsys.readouterr()
    out = ["--forget-classes", "3", "--out", "o"]
    assert main(["unlearn", "--ckpt", "m.pt", "--train-script", "missing.py"] + out) == 2
    assert "--train-script 'missing.py' does not exist" in _err(capsys)
    assert main(["export", "--job", "pretrain", "--train-args=--fast", "--out", "j"]) == 2
    assert "--train-args is for --train-script" in _err(capsys)


def test_cli_words_rewrite_the_library_suggestions():
    from nvflare_unlearn.cli.messages import cli_words

    text = "pass model_name='a.b:f' if that is the model you expect, or allow_import=['a.b'] if you trust it"
    assert (
        cli_words(text) == "pass --model a.b:f if that is the model you expect, or --allow-import a.b if you trust it"
    )
    shape = "set `f.input_shape = (C, H, W)` in 'm', or pass input_shape=(C, H, W) to the recipe (or name the model "
    assert "--model 'm:f@CxHxW'" in cli_words(shape + "'m:f@CxHxW')")
    assert cli_words("x.pt is a plain state_dict: pass model_name and num_classes to rebuild it").endswith(
        "pass --model and --num-classes to rebuild it"
    )


# ------------------------------------------------------------------------------------------------- a quiet console
def _updates(rounds: int = 2) -> list[dict]:
    """What a fine-tuning job's controller writes, in order: three updates per round (start, evaluation, done)."""
    out = [{"phase": "start", "num_rounds": rounds, "started": 0.0, "updated": 1.0}]
    out.append({**out[-1], "evaluated": "original", "u_acc": 0.9, "r_acc": 0.9, "updated": 2.0})
    for r in range(1, rounds + 1):
        base = {**out[-1], "phase": "finetune", "round": r, "rounds_done": r - 1, "phase_started": 2.0}
        evaluated = {**base, "evaluated": f"finetune round {r}", "u_acc": 0.0, "r_acc": 0.95, "updated": 3.0 + 3 * r}
        out += [{**base, "updated": 2.0 + 3 * r}, evaluated, {**evaluated, "rounds_done": r, "updated": 3.5 + 3 * r}]
    out.append({**out[-1], "phase": "done"})
    return out


def test_progress_is_one_readable_line_per_round():
    """run_job reports a change of phase or round only, each line with the latest evaluation; `print` shows a line,
    not a dict; the CLI writes one plain line per report, or one line that rewrites itself on a terminal."""
    import io

    from nvflare_unlearn.cli.commands import ProgressDisplay
    from nvflare_unlearn.fl.run import JobProgress, _Reporter

    seen: list = []
    report = _Reporter(seen.append)
    for update in _updates(rounds=3):
        report(update)
    # a line per phase and per round (start, round 1, 2, 3, done): 5, not the 12 updates; each carries the last
    # evaluation, so the original's shows on round 1's line and the last round's on the done line
    assert [(p["phase"], p.get("round"), p.get("evaluated")) for p in seen] == [("start", None, None)] + [
        ("finetune", r, e) for r, e in ((1, "original"), (2, "finetune round 1"), (3, "finetune round 2"))
    ] + [("done", 3, "finetune round 3")]
    assert str(seen[2]).startswith("phase finetune, round 2/3, finetune round 1: U 0.0% R 95.0%, elapsed 8 s")
    assert "{" not in str(JobProgress(seen[4]))

    plain = io.StringIO()
    display = ProgressDisplay("unlearning", started=0.0, stream=plain, live=False)
    for p in seen:
        display(p)
    display.close()
    assert plain.getvalue().count("\n") == len(seen) == 5 and "\r" not in plain.getvalue()
    live = io.StringIO()
    display = ProgressDisplay("unlearning", started=0.0, stream=live, live=True)
    for p in seen:
        display(p)
    display.close()
    assert live.getvalue().count("\r\x1b[K") == 5 and live.getvalue().count("\n") == 1
