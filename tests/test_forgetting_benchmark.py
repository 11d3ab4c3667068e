"""benchmarks.forgetting_benchmark: the committed results keep the evaluation's contract, the saved arrays reproduce
the JSON's numbers offline, and (slow) the quick digits run works end to end from nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nvflare_unlearn.evaluation.artifacts import load_arrays
from nvflare_unlearn.evaluation.membership import feature_membership_attack, membership_auc

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "forgetting"
COMMITTED = sorted(RESULTS.glob("*.json"))
#: the per-example arrays are not committed (docs/benchmarks.md); this run writes the quick digits run's again
REGENERATE_DIGITS = "regenerate them with: python -m benchmarks.forgetting_benchmark --setting digits --forget 9"


def _check_contract(report: dict) -> None:
    """What issue 12 asks every result file to carry."""
    orig = report["models"]["original"]
    assert 0.0 < orig["test_acc"] <= 1.0
    if report["setting"] == "c10":
        assert orig["test_acc"] >= 0.80, "the CIFAR-10 original must reach 80 % test accuracy"
    refs = [n for n in report["models"] if n.startswith("retrain_")]
    floor = report["noise_floor"]
    keys = ("r_acc", "probe_auc", "relearn_steps", "mia_forget_auc", "lira_auc", "feat_forget_auc")
    assert len(refs) >= 2, "a noise floor needs at least two retrained references"
    for key in keys:
        assert floor[key]["n"] >= 2 and floor[key]["max_abs_diff"] is not None, key
    tests = [m["tests"] for m in report["models"].values()] + [r["tests"] for r in report["runs"].values()]
    for t in tests:
        steps = [s for s, _ in t["relearn"]["curve"]]
        assert steps == list(range(len(steps))), "relearn must be checked after every step"
        for attack in (t["loss_attack"]["forget"], t["feature_attack"]["forget"], t["loss_attack"]["retained_power"]):
            assert attack["low"] <= attack["auc"] <= attack["high"]
        assert t["probe"]["auc_low"] <= t["probe"]["auc"] <= t["probe"]["auc_high"]
    power = report["attack_power"]
    assert 0.0 <= power["loss_attack_retained_accuracy"] <= 1.0
    assert power["lira_original"]["auc"] is not None and power["lira_original"]["tpr_at_fpr"] is not None
    for method, entry in report["summary"].items():
        assert len(entry["seeds"]) >= 3, f"{method}: the headline needs >= 3 seeds"
    budgets = {len(r["history"]) for r in report["runs"].values()}
    assert budgets == {report["config"]["ft_rounds"]}, "every method gets the same fine-tune rounds"
    # rounds to quality are read on the FULL test set, not a subset
    n_test = report["quality_target"]["test_images"]
    assert n_test == {"c10": 10000, "c100m": 10000}.get(report["setting"], n_test) and n_test > report["sets"]["u_test"]
    for r in report["runs"].values():
        assert all(h["r_acc"] is not None for h in r["history"])


@pytest.mark.parametrize("path", COMMITTED, ids=[p.stem for p in COMMITTED])
def test_committed_results_keep_the_contract(path: Path) -> None:
    report = json.loads(path.read_text())
    assert report["complete"], f"{path.name} is an interrupted run"
    _check_contract(report)


@pytest.mark.parametrize("setting", ["digits", "c10"])
def test_the_results_cover_the_issues_forget_sets(setting: str) -> None:
    """Issue 12 asks for forget 9, 3 (cat: a hard class) and 0+5+9 (several at once), at the CI scale and at size."""
    reports = [json.loads(p.read_text()) for p in COMMITTED]
    have = {(r["setting"], "+".join(map(str, r["forget"]))) for r in reports}
    assert {(setting, "9"), (setting, "3"), (setting, "0+5+9")} <= have


@pytest.mark.parametrize("forget", ["9", "3", "0+5+9"])
def test_every_cifar10_forget_set_has_the_issue_13_methods(forget: str) -> None:
    """Issue 13 compares every method on each forget set: fine-tune only, the paper's pruning, pruning 20 % with
    distillation, NegGrad+, SCRUB and random-label fine-tuning with distillation."""
    from benchmarks import render_docs

    have = {m for p in render_docs.goal_sources(f"c10_f{forget}") for m in json.loads(p.read_text())["summary"]}
    assert {"finetune", "prune", "prune@0.2+kd", "neggrad+kd", "scrub", "random_label+kd"} <= have, sorted(have)


def _goal_rows(lines: list[str]) -> dict[str, list[str]]:
    return {r.split("|")[1].strip(" *"): [c.strip() for c in r.split("|")[2:-1]] for r in lines if r.startswith("| **")}


@pytest.fixture(scope="module")
def c10_f3_runs() -> tuple[Any, dict[str, dict]]:
    """The goal-table module and two CIFAR-10 forget-3 runs that share the original, references and budget."""
    from benchmarks import forgetting_goals as fb

    runs = {p.stem: json.loads(p.read_text()) for p in COMMITTED if p.stem in ("c10_f3", "c10_f3_kd")}
    if len(runs) < 2:
        pytest.skip("the CIFAR-10 forget-3 results are not committed")
    return fb, runs


def test_the_goal_table_scores_every_method_against_the_goal(c10_f3_runs: tuple[Any, dict[str, dict]]) -> None:
    """Issue 13's comparison: every method of every run on a forget set gets one row, each goal is read against the
    run's own floor, and a change on either side of a threshold flips its mark."""
    fb, runs = c10_f3_runs
    rows = _goal_rows(fb.goal_table(runs))
    assert set(rows) == {m for r in runs.values() for m in r["summary"]}
    assert all(len(c) == 10 and c[-1].endswith("of 6") for c in rows.values())
    fine = runs["c10_f3"]["summary"]["finetune"]
    assert rows["finetune"][2].endswith("✓") == (fine["u_acc"]["mean"] <= 0.01)
    assert rows["finetune"][4].endswith("✓") == fine["probe_auc"]["within_floor"]
    # move finetune's numbers across the thresholds: U to 2 %, R to 0.4 points under retraining, probe inside the floor
    edited = json.loads(json.dumps(runs))
    e = edited["c10_f3"]["summary"]["finetune"]
    e["u_acc"]["mean"], e["r_acc"]["minus_retrain"], e["probe_auc"]["within_floor"] = 0.02, -0.004, True
    after = _goal_rows(fb.goal_table(edited))["finetune"]
    assert after[2].endswith("✗") and after[3] == "-0.40 ✓" and after[4].endswith("✓")


def test_the_goal_table_refuses_runs_it_cannot_compare(c10_f3_runs: tuple[Any, dict[str, dict]]) -> None:
    """Pooling runs with another reference or budget would compare unequal things: refused, naming the difference."""
    fb, runs = c10_f3_runs
    other = json.loads(json.dumps(runs))
    other["c10_f3_kd"]["models"]["retrain_s1"]["checkpoint"]["sha256"] = "0" * 64
    with pytest.raises(ValueError, match="not comparable.*models"):
        fb.goal_table(other)
    other = json.loads(json.dumps(runs))
    other["c10_f3_kd"]["config"]["ft_rounds"] = 12
    with pytest.raises(ValueError, match="ft_rounds"):
        fb.goal_table(other)
    with pytest.raises(ValueError, match="at least one"):
        fb.goal_table({})


def test_the_memorising_setting_gives_the_attacks_more_power() -> None:
    """Issue 12's attack with power: on the CIFAR-100 original (150 images a class, no augmentation) the loss attack
    separates retained members from non-members well above the CIFAR-10 original's chance level, and LiRA with the
    retrained models as "out" references finds the forget class's training images. The issue's 60 % is not reached
    (docs/benchmarks.md says so and gives the best power found)."""
    c100, c10 = RESULTS / "c100m_f9.json", RESULTS / "c10_f9_all.json"
    if not (c100.is_file() and c10.is_file()):
        pytest.skip("the CIFAR-10 / CIFAR-100 results are not committed")
    power = json.loads(c100.read_text())["attack_power"]
    weak = json.loads(c10.read_text())["attack_power"]
    assert power["loss_attack_retained_accuracy"] > max(0.55, weak["loss_attack_retained_accuracy"] + 0.03)
    assert power["reaches_0.60"] is (power["loss_attack_retained_accuracy"] >= 0.60)
    lira = power["lira_original"]
    assert lira["n_refs"] >= 3 and lira["low"] > 0.5 and lira["tpr_at_fpr"] > 0.01  # above chance at 1 % FPR


def test_saved_arrays_reproduce_the_reported_attacks() -> None:
    """Rerunning attacks offline from the npz gives the JSON's numbers (the arrays are what the tests read)."""
    path = RESULTS / "digits_f9.json"
    report = json.loads(path.read_text())
    folder = RESULTS / "arrays" / "digits_f9"
    if not all((folder / f"{n}.npz").is_file() for n in ("original", "retrain_s0", "finetune_s1")):
        pytest.skip(f"no per-example arrays in {folder} (not committed): {REGENERATE_DIGITS}")
    for name in ("original", "retrain_s0", "finetune_s1"):
        tests = (report["models"].get(name) or report["runs"][name])["tests"]
        arr = load_arrays(folder / f"{name}.npz")
        assert {k: v["labels"].size for k, v in arr.items()} == {
            k: report["sets"][k] for k in ("u_train", "u_test", "r_train", "r_test")
        }
        auc = membership_auc(arr["u_train"]["loss"], arr["u_test"]["loss"], n_boot=10)["auc"]
        assert auc == pytest.approx(tests["loss_attack"]["forget"]["auc"], abs=1e-6)
        feat = feature_membership_attack(arr["u_train"]["features"], arr["u_test"]["features"], n_boot=10)
        assert feat["auc"] == pytest.approx(tests["feature_attack"]["forget"]["auc"], abs=0.02)  # float16 storage
        assert np.all(arr["u_train"]["labels"] == 9) and not np.any(arr["r_test"]["labels"] == 9)


def test_faithfulness_result_says_the_federations_agree() -> None:
    report = json.loads((REPO / "benchmarks" / "results" / "fedsim_faithfulness.json").read_text())
    same = report["nvflare_vs_inprocess_emulating"]
    assert set(same["per_class_count_diffs_per_round"]) == {0} and same["weights_max_abs"] < 1e-5
    assert report["agree_within_noise"] and len(report["noise"]["seeds"]) >= 3


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_quick_run_end_to_end(tmp_path: Path) -> None:
    from benchmarks import forgetting_benchmark as fb

    methods = ("finetune", "row_reset", "fisher")
    args = ["--setting", "digits", "--seeds", "0,1", "--methods", ",".join(methods), "--ft-rounds", "2"]
    args += ["--n-boot", "100", "--out", str(tmp_path)]
    report = fb.main(args)
    res = report["runs"]
    assert report["complete"] and set(res) == {f"{m}_s{s}" for m in methods for s in (0, 1)}
    assert (tmp_path / "originals_digits" / "digits_original_f-_s0.pt").is_file()
    assert res["row_reset_s0"]["tests"]["accuracy"]["u_acc"] == 0.0  # the foil hides the class at the output...
    # ...and leaves the features as they were: the probe still separates the class as well as fine-tune-only does
    assert abs(res["row_reset_s0"]["tests"]["probe"]["auc"] - res["finetune_s0"]["tests"]["probe"]["auc"]) < 0.01
    tune = res["fisher_s0"]["prepare"]["alpha_tuning"]
    assert tune["alpha"] in [float(a) for a in fb.FISHER_ALPHAS.split(",")]
    assert report["summary"]["row_reset"]["u_acc"]["minus_finetune"]["n"] == 2
    assert (tmp_path / "digits_f9.md").read_text().count("| finetune_s1 |") >= 3
    assert {p.stem for p in (tmp_path / "arrays" / "digits_f9").iterdir()} == set(report["models"]) | set(res)
    # an interrupted run resumes: finished method runs are kept as they were, the references retested
    again = fb.main(args + ["--resume"])
    assert again["runs"] == json.loads(json.dumps(res))
    assert again["models"]["original"]["tests"]["accuracy"] == report["models"]["original"]["tests"]["accuracy"]
    # ...and may go on with fewer methods (one interrupted run split over several --tag runs): those listed are kept
    fewer = fb.main([a if a != ",".join(methods) else "row_reset" for a in args] + ["--resume"])
    assert fewer["runs"] == {k: v for k, v in again["runs"].items() if k.startswith("row_reset_")}
    with pytest.raises(SystemExit, match="another configuration"):
        fb.main(args + ["--ft-rounds", "3", "--resume"])


def test_resume_keeps_runs_across_method_lists_and_refuses_another_configuration(tmp_path: Path) -> None:
    """A resumed run may list other methods (each method x seed run is seeded on its own), nothing else may differ."""
    from benchmarks import forgetting_benchmark as fb

    config = vars(fb.parse_args(["--setting", "digits", "--methods", "finetune,prune", "--out", str(tmp_path)]))
    runs = {"finetune_s0": {"method": "finetune"}}
    path = tmp_path / "digits_f9.json"
    path.write_text(json.dumps({"config": config, "runs": runs}))
    assert fb._resumable_runs(path, {**config, "methods": "finetune", "resume": True}) == runs
    with pytest.raises(SystemExit, match="another configuration"):
        fb._resumable_runs(path, {**config, "ft_rounds": config["ft_rounds"] + 1})
    assert fb._resumable_runs(tmp_path / "absent.json", config) == {}
