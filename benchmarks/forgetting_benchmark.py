"""Forgetting, measured so that it can decide: every method on a fixed original, against retrained references.

Inputs are the models of ``benchmarks.originals`` (one original and several retrained references per forget
set, each a checkpoint + JSON). For each method and seed the original is prepared (``evaluation.baselines``) and
fine-tuned with FedAvg on the retained classes in the in-process federation (``evaluation.fedsim``: the same
sites the original was trained on, the original's schedule at the fine-tune lr), and every model (original,
retrained references, unlearned models) gets the same tests:

- accuracy on the FULL test set after every fine-tune round (rounds to retrain quality read from it);
- linear probe forget-class vs rest on penultimate features, with retained-class controls and a bootstrap CI;
- relearn steps at 1-step resolution (accuracy on held-out forget-class images after every step; curve stored);
- membership: the loss attack's POWER on retained members vs non-members (held-out threshold accuracy, AUC + CI),
  its AUC / TPR@1%FPR on forget-class train vs test images, offline LiRA on the forget class with the retrained
  models as "out" references (leave-one-out for a reference itself), and a feature-space shadow classifier;
- class-wise KL / max gap to the retrained references;

then per metric the retrain-vs-retrain noise floor, t-intervals over seeds and paired differences between
methods. Per-example losses, logits and penultimate features of U-train, U-test, an R-train and an R-test sample are
saved per model (npz) so attacks can be rerun offline. Output: ``<out>/<setting>_f<forget>[_<tag>].json`` (rewritten
after every model), ``.md`` and ``arrays/``.

    python -m benchmarks.forgetting_benchmark --setting digits            # CI size: builds its own digits originals
    python -m benchmarks.forgetting_benchmark --setting c10 --forget 9    # needs benchmarks/results/originals/
    python -m benchmarks.forgetting_benchmark --setting c100m --forget 9

The method vocabulary is ``forgetting_methods``, the tests ``forgetting_eval``, the tables ``forgetting_tables``, the
goal table and the default's rule ``forgetting_goals``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import originals  # the settings and data of the originals: one definition
from benchmarks.forgetting_eval import Evaluator, build_sets, distances_to_refs, summarise
from benchmarks.forgetting_methods import DEFAULT_METHODS, METHODS, MethodSpec, parse_method
from benchmarks.forgetting_tables import _project_path, markdown
from benchmarks.harness import (
    RESULTS,
    add_data_root_arg,
    add_output_args,
    apply_preset,
    command_line,
    elapsed,
    fed_config,
    floats,
    ints,
    log,
    machine,
    parser,
    strs,
    u_r_curve,
    utc_now,
    write_json,
)
from nvflare_unlearn import _io, load_checkpoint
from nvflare_unlearn.evaluation.baselines import PruneOptions, prepare_method, site_objectives
from nvflare_unlearn.evaluation.fedsim import CostMeter, Federation, run_fedavg, state_bytes
from nvflare_unlearn.options import PlanOptions

DEFAULT_OUT = RESULTS / "forgetting"


# Fine-tune and test sizes per setting; every flag below overrides them.
# fmt: off
PRESETS: dict[str, dict[str, Any]] = {
    "digits": dict(
        ft_rounds=6, ft_lr=0.02, r_sample_n=300, probe_train_n=None, fisher_images=None,
        relearn_forget_n=20, relearn_retain_n=200, relearn_lr=0.01, relearn_batch=32, relearn_max_steps=200,
        relearn_eval_n=None,
    ),
}
PRESETS["c10"] = PRESETS["digits"] | dict(
    ft_lr=0.01, r_sample_n=2000, probe_train_n=5000, fisher_images=400,
    relearn_forget_n=100, relearn_retain_n=900, relearn_batch=64, relearn_max_steps=300, relearn_eval_n=500,
)
PRESETS["c100m"] = PRESETS["c10"] | dict(
    ft_rounds=5, fisher_images=300, relearn_forget_n=50, relearn_retain_n=450, relearn_eval_n=None,
)
# fmt: on

FISHER_ALPHAS = "1e-8,1e-7,1e-6,1e-5,1e-4,1e-3"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--setting", choices=sorted(PRESETS), default="digits", help="an originals.py setting")
    p.add_argument("--forget", default="9", help="forget classes, e.g. 9 or 0,5,9 (must match retrained references)")
    p.add_argument("--seeds", default="0,1,2", help="seeds of every method (client sampling, batch order, noise)")
    p.add_argument("--original-seed", type=int, default=0)
    p.add_argument("--originals", default=None, help="folder of originals.py outputs (default per setting)")
    add_data_root_arg(p)
    p.add_argument(
        "--methods",
        default=DEFAULT_METHODS,
        help=f"comma-separated; each <prepare>[@<ratio>][+kd] with <prepare> in {METHODS[1:]} or "
        f"neggrad/random_label/scrub (e.g. prune@0.2+kd, neggrad+kd)",
    )
    p.add_argument("--ft-rounds", type=int, help="fine-tune rounds of EVERY method (the shared budget)")
    p.add_argument("--ft-lr", type=float, help="peak fine-tune lr (cosine to 0)")
    p.add_argument("--prune-ratio", type=float, default=0.05, help="prune: share of coupled channel units removed")
    p.add_argument("--fisher-alphas", default=FISHER_ALPHAS, help="fisher: alpha grid tuned on retained data")
    p.add_argument("--fisher-max-r-drop", type=float, default=0.1, help="fisher: retained-accuracy drop allowed")
    p.add_argument("--fisher-images", type=int, help="fisher: retained images per participating site")
    p.add_argument("--r-sample-n", type=int, help="retained train / test images for the membership tests")
    p.add_argument("--probe-train-n", type=int, help="training images behind the linear probe")
    p.add_argument("--relearn-forget-n", type=int)
    p.add_argument("--relearn-retain-n", type=int)
    p.add_argument("--relearn-lr", type=float)
    p.add_argument("--relearn-batch", type=int)
    p.add_argument("--relearn-max-steps", type=int)
    p.add_argument("--relearn-eval-n", type=int, help="held-out forget-class images scored after every step")
    p.add_argument("--relearn-target", type=float, default=0.5)
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples behind every AUC interval")
    p.add_argument("--no-arrays", action="store_true", help="do not save per-example arrays (npz)")
    add_output_args(p, DEFAULT_OUT, threads=1)
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the method runs of an interrupted run with the same configuration (references are retested); "
        "the method list may change, so one interrupted run can be split over several --tag runs",
    )
    args = p.parse_args(argv)
    apply_preset(args, PRESETS[args.setting])
    if args.originals is None:
        args.originals = str(Path(args.out) / "originals_digits" if args.setting == "digits" else RESULTS / "originals")
    return args


def load_models(args: argparse.Namespace, forget: list[int]) -> dict[str, Any]:
    """The original and every retrained reference for ``forget`` (digits: trained here when missing)."""
    root = Path(args.originals)
    ftag = "+".join(map(str, forget))
    orig_name = originals.job_name(args.setting, "original", (), args.original_seed)
    if args.setting == "digits":  # the CI stand-in: deterministic and seconds to build, so built on demand
        for kind, fg, s in [("original", (), args.original_seed)] + [("retrain", tuple(forget), s) for s in (0, 1, 2)]:
            if not (root / f"{originals.job_name(args.setting, kind, fg, s)}.json").is_file():
                log(f"building {originals.job_name(args.setting, kind, fg, s)} (originals.py, digits setting)")
                originals.run_job(args.setting, kind, fg, s, out=root, data_root=args.data_root)
    if not (root / f"{orig_name}.json").is_file():
        raise SystemExit(
            f"{root / orig_name}.json not found: make it with "
            f"python -m benchmarks.originals --only {args.setting}:original:-:{args.original_seed} --out {root}"
        )
    refs = sorted(root.glob(f"{args.setting}_retrain_f{ftag}_s*.json"))
    if not refs:
        raise SystemExit(
            f"no retrained reference {args.setting}_retrain_f{ftag}_s*.json in {root}: make them with "
            f"python -m benchmarks.originals --only {args.setting}:retrain:{ftag}:0,{args.setting}:retrain:{ftag}:1"
        )
    out = {"original": _load_one(root, orig_name, args.setting)}
    for path in refs:
        rec = _load_one(root, path.stem, args.setting)
        out[f"retrain_s{rec['json']['seed']}"] = rec
    if len(refs) < 2:
        log(f"only {len(refs)} retrained reference: no noise floor, and LiRA has no reference for it")
    return out


def _load_one(root: Path, name: str, setting: str) -> dict[str, Any]:
    meta = json.loads((root / f"{name}.json").read_text())
    cfg = originals.SETTINGS[setting]
    for key in ("dataset", "model", "sites", "partition_seed", "train_images"):
        if meta["config"].get(key) != cfg.get(key):
            raise SystemExit(f"{name}: its {key} {meta['config'].get(key)!r} differs from originals.py's {cfg[key]!r}")
    model, _plan, _meta = load_checkpoint(root / meta["checkpoint"]["file"])
    return {"json": meta, "model": model.eval(), "path": str(root / meta["checkpoint"]["file"])}


@dataclass
class Run:
    """One forgetting benchmark run: the flags, the data and federation, the tests, the report being written."""

    args: argparse.Namespace
    forget: list[int]
    data: dict[str, Any]
    fed: Federation
    ev: Evaluator
    report: dict[str, Any]
    stem: Path
    ref_names: list[str]

    def save(self, final: bool = False) -> None:
        """The JSON and the markdown page as they stand (after every model: a killed run keeps what it measured)."""
        report = self.report
        report["wall_s"] = elapsed()
        report["complete"] = final
        summarise(report, self.ref_names)
        write_json(self.stem.with_suffix(".json"), report)
        title = (
            f"# Forgetting benchmark: {report['setting']}, forget {self.forget} ({', '.join(report['class_names'])})"
        )
        rel = _project_path(self.stem.with_suffix(".json"))
        _io.write_text(self.stem.with_suffix(".md"), "\n".join([title, "", *markdown(report, rel)]) + "\n")

    def ref_accs(self) -> dict[str, list[float]]:
        return {n: self.report["models"][n]["tests"]["accuracy"]["class_acc"] for n in self.ref_names}


def test_references(run: Run, models: dict[str, Any]) -> float:
    """Test the original and every retrained reference; returns the R accuracy that counts as retrain quality."""
    report = run.report
    for name, rec in models.items():
        meta = rec["json"]
        log(f"testing {name} ({meta['test']['acc']:.4f} test accuracy when made)")
        tests = run.ev.run(name, rec["model"], seed=int(meta["seed"]))  # relearn batch order varies as for methods
        report["models"][name] = {"kind": meta["kind"], "seed": meta["seed"], "checkpoint": meta["checkpoint"]}
        report["models"][name] |= {
            "test_acc": tests["accuracy"]["acc"],
            "train_subset_acc": meta["train_subset"]["acc"],
        }
        report["models"][name] |= {"training_cost": meta["cost"], "tests": tests}
        run.save()
    ref_accs = run.ref_accs()
    for name in models:
        t = report["models"][name]["tests"]
        t["lira"] = run.ev.lira(name, run.ref_names)
        t.update(distances_to_refs(t["accuracy"]["class_acc"], ref_accs, name))
    r_target = float(np.mean([report["models"][n]["tests"]["accuracy"]["r_acc"] for n in run.ref_names])) - 0.01
    report["quality_target"] = {"r_acc_at_least": r_target, "u_acc_at_most": 0.01}
    report["quality_target"]["test_images"] = int(run.data["yt"].numel())
    run.save()
    return r_target


def run_method(run: Run, spec: MethodSpec, seed: int, original: torch.nn.Module, r_target: float) -> dict[str, Any]:
    """One method at one seed: prepare the original, fine-tune with the shared budget, test; the run's record."""
    args, fed, forget = run.args, run.fed, run.forget
    curve = u_r_curve(run.data["xt"], run.data["yt"], run.data["num_classes"], forget)
    c0 = time.process_time()
    meter = CostMeter()
    scfg = originals.SETTINGS[args.setting]
    participants = fed.sample_sites(-1, scfg["fed"]["clients_per_round"], seed)
    fisher = {"fisher_alphas": floats(args.fisher_alphas), "fisher_max_r_drop": args.fisher_max_r_drop}
    fisher["fisher_images_per_site"] = args.fisher_images
    prune = PruneOptions(plan=PlanOptions(prune_ratio=spec.ratio or args.prune_ratio))
    prep = prepare_method(
        spec.prepare, original, fed, forget, participants, meter, seed=seed, prune_opts=prune, **fisher
    )
    model = prep.model
    after = curve(model, 0)
    ft = fed_config(scfg["fed"], rounds=args.ft_rounds, lr=args.ft_lr, seed=seed)
    teacher = original if spec.objective.needs_teacher else None
    site_loss = site_objectives(spec.objective, fed, forget, teacher, batch_size=ft.batch_size, seed=seed)
    hist = run_fedavg(
        model, fed, ft, drop_classes=forget, meter=meter, eval_fn=curve, phase="finetune", site_objective=site_loss
    )
    rq = next((h["round"] for h in hist if h["r_acc"] >= r_target and (h["u_acc"] or 0.0) <= 0.01), None)
    cpu_train = time.process_time() - c0  # prepare + fine-tune + the per-round full-test curve
    log(f"  R {hist[-1]['r_acc']:.4f} U {hist[-1]['u_acc']:.4f}, rounds to quality {rq}; testing")
    name = f"{spec.name}_s{seed}"
    tests = run.ev.run(name, model, seed=seed)
    tests["lira"] = run.ev.lira(name, run.ref_names)
    tests.update(distances_to_refs(tests["accuracy"]["class_acc"], run.ref_accs(), None))
    tests["rounds_to_quality"] = rq
    record = {"method": spec.name, "prepare_method": spec.prepare, "objective": spec.objective.to_dict()}
    record |= {"prune_ratio": spec.ratio, "seed": seed, "participants": participants}
    record |= {"prepare": {k: v for k, v in prep.info.items() if k != "plan"}, "after_prepare": after}
    record |= {"finetune_config": ft.to_dict(), "history": hist, "cost": meter.snapshot()}
    record["cpu_seconds"] = {"prepare_finetune_curve": cpu_train, "tests": tests["test_cpu_seconds"]}
    return record | {"params": tests["params"], "state_bytes": state_bytes(model), "tests": tests}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    forget = sorted(set(ints(args.forget)))
    methods = strs(args.methods)
    specs = {m: parse_method(m, args.prune_ratio) for m in methods}
    seeds = ints(args.seeds)
    stem = f"{args.setting}_f{'+'.join(map(str, forget))}{('_' + args.tag) if args.tag else ''}"
    out_dir = Path(args.out)

    log(f"setting {args.setting}: loading data and models (forget {forget})")
    data = originals.setting_data(args.setting, args.data_root)
    if any(not 0 <= c < data["num_classes"] for c in forget):
        raise SystemExit(f"--forget must name classes in 0..{data['num_classes'] - 1}")
    models = load_models(args, forget)
    sets = build_sets(data["y"].numpy(), data["yt"].numpy(), forget, args)
    ev = Evaluator(data, forget, sets, args, None if args.no_arrays else out_dir / "arrays" / stem)

    report: dict[str, Any] = {
        "generated_utc": utc_now(),
        "command": command_line("forgetting_benchmark", argv),
        "machine": machine(),
        "setting": args.setting,
        "forget": forget,
        "class_names": [data["classes"][c] for c in forget],
        "seeds": seeds,
        "methods": methods,
        "config": dict(vars(args)),
        "setting_config": originals.SETTINGS[args.setting],
        "sets": {k: int(v.size) for k, v in vars(sets).items() if isinstance(v, np.ndarray)},
        "models": {},
        "runs": {},
        "complete": False,
    }
    fed = Federation(data["x"], data["y"], data["parts"], data["num_classes"])
    ref_names = [n for n in models if n.startswith("retrain_")]
    run = Run(args, forget, data, fed, ev, report, out_dir / stem, ref_names)
    earlier = _resumable_runs(run.stem.with_suffix(".json"), report["config"]) if args.resume else {}
    r_target = test_references(run, models)

    # -- methods x seeds, every one with the same fine-tune budget
    for method in methods:
        for seed in seeds:
            name = f"{method}_s{seed}"
            if name in earlier:
                log(f"method {method}, seed {seed}: kept from the interrupted run")
                report["runs"][name] = earlier[name]
                continue
            log(f"method {method}, seed {seed}")
            report["runs"][name] = run_method(run, specs[method], seed, models["original"]["model"], r_target)
            run.save()
    run.save(final=True)
    log(f"done: {run.stem.with_suffix('.json')}")
    return report


def _resumable_runs(path: Path, config: dict[str, Any]) -> dict[str, Any]:
    """The finished method runs of an earlier report at ``path`` made with the same configuration (else none).

    The method list is not part of the comparison: every method x seed run is seeded on its own and tested against the
    same references, so a run kept from a longer list is the run the shorter list would have made."""
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    ignore = {"resume", "methods"}
    if {k: v for k, v in old["config"].items() if k not in ignore} != {
        k: v for k, v in config.items() if k not in ignore
    }:
        raise SystemExit(f"--resume: {path} was made with another configuration; move it away or drop --resume")
    log(f"--resume: {path.name} has {len(old['runs'])} finished method run(s); those of the listed methods are kept")
    return old["runs"]
