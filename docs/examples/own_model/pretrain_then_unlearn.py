"""Job script: train the user's own model with their own Client API script, then make it forget a class.

    python pretrain_then_unlearn.py                       # pretrain, then unlearn digit 3 (SimEnv, 2 sites)
    python pretrain_then_unlearn.py --initial-ckpt /path/FL_global_model.pt   # unlearn an existing model instead
    python pretrain_then_unlearn.py --export-jobs /tmp/jobs # only write the two job folders

Both jobs run the user's ``train_client.py`` on the sites (it loads its own data with ``my_data.py``) and name the
model by its factory, ``my_net:build_net``. NVFlare copies ``train_client.py`` and the local modules it imports into
each site's job code; the recipes add ``my_net.py`` to the server's too (the server rebuilds and prunes the model).

Prints accuracy on the forgotten (U) and retained (R) classes before and after, and the parameter counts; exits
with status 1 when unlearning did not reach the targets (U <= --max-u, R >= original R - --max-r-drop, fewer
parameters).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # running from another folder: the user's modules live next to this script
    sys.path.insert(0, HERE)

from my_net import build_net  # noqa: E402  (the user's model factory)

#: Relative to this folder, as NVFlare expects: the script (and the local modules it imports) are bundled into the
#: job's custom code. An absolute path would tell NVFlare the script is already installed at that path on every site.
TRAIN_SCRIPT = "train_client.py"
NUM_CLASSES = 10


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workspace", default="/tmp/own_model_unlearn", help="simulator workspace")
    p.add_argument("--num-clients", type=int, default=2)
    p.add_argument("--forget-classes", type=int, nargs="+", default=[3], help="class id(s) to forget")
    p.add_argument("--pretrain-rounds", type=int, default=3)
    p.add_argument("--pretrain-epochs", type=int, default=3)
    p.add_argument("--pretrain-lr", type=float, default=0.05)
    p.add_argument(
        "--prune-ratio", type=float, default=0.3, help="fraction of conv channels pruned per forgotten class"
    )
    p.add_argument("--num-rounds", type=int, default=3, help="fine-tuning rounds after pruning")
    p.add_argument("--lr", type=float, default=0.01, help="fine-tuning learning rate")
    p.add_argument("--initial-ckpt", help="unlearn this trained model (e.g. FL_global_model.pt) instead of pretraining")
    p.add_argument("--export-jobs", help="export both jobs into this folder instead of running them")
    p.add_argument("--max-u", type=float, default=0.05, help="largest acceptable forget-class accuracy afterwards")
    p.add_argument("--max-r-drop", type=float, default=0.05, help="largest acceptable drop of retained accuracy")
    p.add_argument("--summary", help="also write the numbers as JSON to this file")
    return p.parse_args(argv)


def pretrain_recipe(a):
    from nvflare_unlearn.fl import PretrainRecipe

    return PretrainRecipe(
        name="own_model_pretrain",
        model=build_net,  # the factory itself: recorded as its import path, "my_net:build_net"
        num_classes=NUM_CLASSES,
        num_clients=a.num_clients,
        num_rounds=a.pretrain_rounds,
        train_script=TRAIN_SCRIPT,
        train_args=f"--n_sites {a.num_clients} --epochs {a.pretrain_epochs} --lr {a.pretrain_lr}",
    )


def unlearning_recipe(a, initial_ckpt: str, check_ckpt: bool = True):
    from nvflare_unlearn.fl import UnlearningRecipe

    return UnlearningRecipe(
        name="own_model_unlearn",
        model="my_net:build_net",  # the same model, by import path
        num_classes=NUM_CLASSES,
        initial_ckpt=initial_ckpt,
        check_ckpt=check_ckpt,
        forget_classes=a.forget_classes,
        prune_ratio=a.prune_ratio,
        num_rounds=a.num_rounds,
        num_clients=a.num_clients,
        train_script=TRAIN_SCRIPT,
        train_args=f"--n_sites {a.num_clients} --epochs 1 --lr {a.lr}",
    )


def main(argv=None) -> int:
    a = parse_args(argv)
    for attr in ("workspace", "initial_ckpt", "export_jobs", "summary"):  # user paths, before changing folder
        if getattr(a, attr):
            setattr(a, attr, os.path.abspath(getattr(a, attr)))
    os.chdir(HERE)  # NVFlare resolves train_script= relative to the working folder
    if a.export_jobs:  # job folders for `nvflare job submit` / the admin console
        pretrain_recipe(a).export(a.export_jobs)
        ckpt = os.path.abspath(a.initial_ckpt) if a.initial_ckpt else "/path/on/server/FL_global_model.pt"
        unlearning_recipe(a, ckpt, check_ckpt=False).export(a.export_jobs)
        print(f"exported own_model_pretrain and own_model_unlearn into {a.export_jobs}")
        return 0

    from nvflare.recipe.sim_env import SimEnv

    from nvflare_unlearn.fl import quiet_log_config, read_job_result

    env = SimEnv(
        num_clients=a.num_clients,
        num_threads=a.num_clients,
        workspace_root=a.workspace,
        log_config=quiet_log_config(a.workspace),
    )
    summary: dict = {"forget_classes": a.forget_classes, "ratio": a.prune_ratio}
    ckpt = a.initial_ckpt
    if ckpt is None:
        started = time.time()
        trained = read_job_result(pretrain_recipe(a).execute(env).get_result())
        ckpt = trained.model_path
        summary["pretrain"] = {"acc": trained.metrics["final"]["acc"], "seconds": round(time.time() - started, 1)}
        print(
            f"pretrained {a.pretrain_rounds} rounds: accuracy {trained.metrics['final']['acc']:.3f} "
            f"({summary['pretrain']['seconds']} s) -> {ckpt}"
        )

    started = time.time()
    result = read_job_result(unlearning_recipe(a, ckpt).execute(env).get_result())
    m = result.metrics
    orig, pruned, final = m["original"], m["pruned"], m["unlearned"]
    summary.update(
        original={"u_acc": orig["u_acc"], "r_acc": orig["r_acc"]},
        pruned={"u_acc": pruned["u_acc"], "r_acc": pruned["r_acc"]},
        unlearned={"u_acc": final["u_acc"], "r_acc": final["r_acc"]},
        params_before=m["params_before"],
        params_after=m["params_after"],
        rounds=m["rounds"],
        objective=m["objective"],  # the loss each site's script reports it minimised, against the request
        seconds=round(time.time() - started, 1),
        model_path=result.model_path,
    )
    print(
        f"unlearned classes {a.forget_classes} at ratio {a.prune_ratio}, {m['rounds']} fine-tuning rounds "
        f"({summary['seconds']} s)"
    )
    for stage, acc in (("original", orig), ("pruned", pruned), ("unlearned", final)):
        print(f"  {stage:>9}: U (forgotten) {acc['u_acc']:.3f}   R (retained) {acc['r_acc']:.3f}")
    print(f"  parameters: {m['params_before']:,} -> {m['params_after']:,}")
    print(f"  model (weights + plan): {result.model_path}")

    failures = []
    if final["u_acc"] > a.max_u:
        failures.append(f"forget-class accuracy {final['u_acc']:.3f} > {a.max_u}")
    if final["r_acc"] < orig["r_acc"] - a.max_r_drop:
        failures.append(f"retained accuracy fell from {orig['r_acc']:.3f} to {final['r_acc']:.3f}")
    if m["params_after"] >= m["params_before"]:
        failures.append("the model did not get smaller")
    if m["objective"]["not_as_requested"]:
        failures.append(f"sites did not run the requested loss: {m['objective']}")
    summary["ok"] = not failures
    if a.summary:
        with open(a.summary, "w") as f:
            json.dump(summary, f, indent=2)
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
