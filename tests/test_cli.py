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
