"""docs/benchmarks.md's result tables are generated from the committed JSON (benchmarks.render_docs)."""

from __future__ import annotations

from bench_helpers import renderer_tests

test_benchmark_docs_match_the_committed_json, test_render_docs_detects_a_hand_edited_table = renderer_tests(
    "render_docs", "benchmarks.md", "h100", "| finetune |", "| finetune (edited) |"
)


def test_the_jobs_default_method_is_the_one_the_committed_evidence_picks() -> None:
    """unlearning.defaults.measured_defaults and the rule over the CIFAR-10 goal tables name the same method: a new
    run that changes the winner fails here until the default follows it (or the rule is argued anew)."""
    import copy

    from benchmarks import forgetting_goals, render_docs
    from nvflare_unlearn.unlearning import MethodOptions, measured_defaults

    sets = {label: render_docs.finished_runs(key) for label, key in render_docs.DEFAULT_RULE_SETS.items()}
    assert all(sets.values()), "the CIFAR-10 forgetting runs are missing from benchmarks/results/forgetting/"
    _table, winner = forgetting_goals.default_rule(sets)
    job = MethodOptions(**measured_defaults(set()).values)
    assert winner == job.method + ("+kd" if job.recovery == "kd" else "")

    # the rule is not fixed on its answer: make NegGrad+ leave 5 % of truck and random-label + KD wins
    moved = copy.deepcopy(sets)
    for rep in moved["truck"].values():
        if "neggrad+kd" in rep["summary"]:
            rep["summary"]["neggrad+kd"]["u_acc"]["mean"] = 0.05
    assert forgetting_goals.default_rule(moved)[1] == "random_label+kd"
