"""The method registry (issue 21): one home per method, one spelling, one site path, one default from the evidence."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from core_helpers import digits_tensors, loader, trained_digits_cnn

from nvflare_unlearn.runtime import train_epochs
from nvflare_unlearn.unlearning import (
    MethodOptions,
    UnlearningMethod,
    all_methods,
    get_method,
    measured_defaults,
    method_names,
    parse_variant,
    register,
    reported_loss,
    site_losses,
    site_objective,
    variant_label,
)
from nvflare_unlearn.unlearning import defaults as defaults_module
from nvflare_unlearn.unlearning import registry as registry_module

BUILTIN = {"finetune", "neggrad", "prune", "random_label", "scrub"}


@pytest.fixture
def own_method():
    """A user's method registered for one test, then removed (the registry is process-wide)."""

    class Noisy(UnlearningMethod):
        name = "noisy_test_method"
        summary = "test-only: counts its hook calls"
        calls = 0

        def before_step(self, obj, model):
            type(self).calls += 1

    register(Noisy)
    yield Noisy
    registry_module._REGISTRY.pop(Noisy.name, None)


def test_every_builtin_is_found_in_its_own_module_and_declares_itself():
    import nvflare_unlearn.unlearning as package

    found = all_methods()
    assert package.all_methods is all_methods, "the registry's function is not shadowed by the methods/ subpackage"
    assert BUILTIN <= set(found)
    for name, m in found.items():
        assert m.name == name and m.summary, name
        assert type(m).__module__ == f"nvflare_unlearn.unlearning.methods.{name}", "one module per method"
        if m.uses_forget_data:  # a forget-data method must define its term
            assert type(m).forget_term is not UnlearningMethod.forget_term, name
    assert get_method("prune").prunes and not any(found[n].prunes for n in ("finetune", "neggrad", "scrub"))


def test_options_validate_against_the_registry(own_method):
    with pytest.raises(ValueError, match="method must be one of"):
        MethodOptions(method="gradient_ascent")
    assert MethodOptions(method=own_method.name).spec is all_methods()[own_method.name]
    with pytest.raises(ValueError, match="unknown unlearning method 'nope'"):
        get_method("nope")


def test_register_refuses_a_taken_or_malformed_name(own_method):
    class Clash(UnlearningMethod):
        name = own_method.name

    class Bad(UnlearningMethod):
        name = "Not A Name"

    with pytest.raises(ValueError, match="is taken by"):
        register(Clash)

    class Greedy(UnlearningMethod):
        name = "greedy_test_method"
        needs = frozenset({"the_server_sees_images"})

    with pytest.raises(ValueError, match="lower-case identifier"):
        register(Bad)
    with pytest.raises(ValueError, match="may need"):
        register(Greedy)


@pytest.mark.parametrize(
    "text, flat",
    [
        ("prune@0.2+kd", {"method": "prune", "prune_ratio": 0.2, "recovery": "kd"}),
        ("neggrad+kd", {"method": "neggrad", "recovery": "kd"}),
        ("finetune", {"method": "finetune", "recovery": "ce"}),
        ("scrub", {"method": "scrub", "recovery": "kd"}),  # always distils: no "+kd" in its label
        ("row_reset", {"method": "finetune", "reset_rows": True, "recovery": "ce"}),
        ("prune_reinit+kd", {"method": "prune", "prune_mode": "reinit", "recovery": "kd"}),
    ],
)
def test_a_variant_is_a_method_plus_options_spelled_one_way(text, flat):
    assert parse_variant(text) == flat
    assert variant_label(flat) == text


@pytest.mark.parametrize("text, match", [("neggrad@0.2", "does not prune"), ("nope+kd", "unknown"), ("x y", "must")])
def test_a_bad_variant_is_refused(text, match):
    with pytest.raises(ValueError, match=match):
        parse_variant(text)


def test_site_losses_come_from_the_methods_and_a_report_outside_them_is_malformed():
    assert {"ce", "kd", "neggrad+kd", "random_label+ce", "scrub"} <= site_losses()
    assert reported_loss({"loss": "neggrad+kd", "steps": 3, "forget_steps": 3}) == "neggrad+kd"
    assert reported_loss({"loss": "neggrad+kd", "steps": 3, "forget_steps": 0}) == "neggrad+kd (no forget-class step)"
    assert reported_loss({"loss": "gradient_ascent", "steps": 3, "forget_steps": 0}) == "malformed report"


def test_one_site_path_falls_back_to_the_retained_term_without_forget_data():
    model = trained_digits_cnn()
    built: list[str] = []

    def teacher():
        built.append("teacher")
        return model

    assert site_objective(None, [3], 10, teacher, None) is None  # no method: pretraining / retraining
    assert site_objective({"method": "neggrad", "recovery": "kd"}, [], 10, teacher, None) is None
    obj = site_objective({"method": "neggrad", "recovery": "kd"}, [3], 10, teacher, lambda: None)
    assert obj.options.method == "finetune" and obj.report()["loss"] == "kd" and built == ["teacher"]
    plain = site_objective({"method": "neggrad", "recovery": "ce"}, [3], 10, teacher, [])
    assert plain.report()["loss"] == "ce" and built == ["teacher"], "the teacher is built only when needed"


def test_the_hook_between_backward_and_step_runs_every_batch(own_method):
    model = trained_digits_cnn()
    xtr, ytr, _, _ = digits_tensors()
    keep = ytr != 3
    obj = site_objective({"method": own_method.name, "recovery": "ce"}, [3], 10)
    grads_seen = []

    def before_step(m):  # wraps the method's hook: the gradients exist here, the step has not happened
        grads_seen.append(all(p.grad is not None for p in m.parameters() if p.requires_grad))
        obj.before_step(m)

    steps = train_epochs(model, loader(xtr[keep], ytr[keep], 256), 1, 0.01, loss_fn=obj.batch_loss,
                         before_step=before_step)  # fmt: skip
    assert own_method.calls == steps == len(grads_seen) and all(grads_seen)


def test_the_default_is_the_committed_evidences_winner_and_follows_it(monkeypatch, tmp_path):
    """The rule lives in the package and reads evidence.json: change the evidence and the default moves."""
    evidence = json.loads(defaults_module.EVIDENCE_PATH.read_text())
    rows, winner = defaults_module.default_rule(evidence["sets"])
    chosen = measured_defaults(set()).values
    assert variant_label({"recovery": "ce", **chosen}) == winner
    assert rows[0].method == winner and rows[0].eligible
    for cells in evidence["sets"].values():  # make the winner leave 5 % of the class: the runner-up takes over
        cells[winner]["u_acc"] = 0.05
    moved = tmp_path / "evidence.json"
    moved.write_text(json.dumps(evidence))
    monkeypatch.setattr(defaults_module, "EVIDENCE_PATH", moved)
    defaults_module._committed_winner.cache_clear()
    try:
        assert variant_label({"recovery": "ce", **measured_defaults(set()).values}) == rows[1].method != winner
    finally:
        defaults_module._committed_winner.cache_clear()
    assert measured_defaults({"prune_ratio"}).values == {"method": "prune", "recovery": "ce"}
    assert measured_defaults({"method"}).values == {"recovery": "ce"}
    assert measured_defaults({"method", "recovery"}).values == {}


def test_unset_options_resolve_to_the_default_everywhere():
    resolved = MethodOptions().resolved()
    assert {"method": resolved.method, "recovery": resolved.recovery} == measured_defaults(set()).values
    assert MethodOptions(method="prune").resolved().recovery == "ce"
    assert set(method_names()) >= BUILTIN


def test_a_method_distils_toward_its_teacher_only_on_retained_classes():
    """The shared distillation masks the forget classes: a student equal to its teacher pays no KD."""
    model = trained_digits_cnn()
    xtr, ytr, _, _ = digits_tensors()
    obj = site_objective({"method": "finetune", "recovery": "kd"}, [3], 10, model, None)
    with torch.no_grad():
        logits = model(xtr[:64])
    assert float(obj.distillation(logits, xtr[:64])) == pytest.approx(0.0, abs=1e-5)
    assert float(obj.batch_loss(model, xtr[:64], ytr[:64])) == pytest.approx(
        float(F.cross_entropy(logits, ytr[:64])), rel=1e-4
    )
    assert torch.isfinite(obj.batch_loss(model, xtr[:64], ytr[:64]))
