"""Continue federated training of an unlearned model with NVFlare's stock FedAvgRecipe and PTFileModelPersistor.

    python continue_fedavg.py --ckpt runs/demo/unlearned_model.pt        # 2 more FedAvg rounds (SimEnv, 2 sites)

The server's persistor instantiates ``UnlearnedModel`` from its JSON arguments (the checkpoint's path); the sites
run the ordinary Client API script ``client.py``. Prints the accuracy on the forgotten (U) and retained (R) digits of
the checkpoint and of the model after the extra rounds, read back from NVFlare's own ``FL_global_model.pt``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from torch.utils.data import DataLoader

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL_CLASS = "nvflare_unlearn.method.export.UnlearnedModel"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="the unlearned model, e.g. runs/demo/unlearned_model.pt")
    p.add_argument("--workspace", default="/tmp/way_back", help="simulator workspace")
    p.add_argument("--num-clients", type=int, default=2)
    p.add_argument("--num-rounds", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--summary", help="also write the numbers as JSON to this file")
    return p.parse_args(argv)


def u_r(model, forget):
    from nvflare_unlearn.data import digits_dataset
    from nvflare_unlearn.evaluation import class_correct_total, u_r_accuracy

    correct, total = class_correct_total(model, DataLoader(digits_dataset("test"), batch_size=256), 10)
    acc = u_r_accuracy(correct, total, forget)
    return {"u_acc": acc["u_acc"], "r_acc": acc["r_acc"]}


def main(argv=None) -> int:
    a = parse_args(argv)
    ckpt, workspace = os.path.abspath(a.ckpt), os.path.abspath(a.workspace)
    os.chdir(HERE)  # NVFlare resolves train_script= relative to the working folder
    from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe
    from nvflare.recipe.sim_env import SimEnv

    from nvflare_unlearn.method.export import UnlearnedModel

    recipe = FedAvgRecipe(
        name="continue_fedavg",
        model={"path": MODEL_CLASS, "args": {"ckpt": ckpt}},  # what PTFileModelPersistor instantiates
        min_clients=a.num_clients,
        num_rounds=a.num_rounds,
        train_script="client.py",
        train_args=f"--ckpt {ckpt} --n_sites {a.num_clients} --lr {a.lr}",
    )
    env = SimEnv(num_clients=a.num_clients, num_threads=a.num_clients, workspace_root=workspace)
    run = recipe.execute(env)
    result = run.get_result()
    final = os.path.join(result, "server", "simulate_job", "app_server", "FL_global_model.pt")
    if not os.path.isfile(final):
        print(f"FedAvg did not write {final}: see the logs under {result}", file=sys.stderr)
        return 1
    before = UnlearnedModel(ckpt=ckpt)
    after = UnlearnedModel(ckpt=ckpt)
    after.load_state_dict(torch.load(final, weights_only=True)["model"])  # NVFlare's {"model": state_dict, ...}
    forget = before.forget_classes
    summary = {
        "forget_classes": forget,
        "rounds": a.num_rounds,
        "final_model": final,
        "unlearned": u_r(before, forget),
        "continued": u_r(after, forget),
        "params": sum(p.numel() for p in after.parameters()),
        "changed": any(
            not torch.equal(x, y) for x, y in zip(before.state_dict().values(), after.state_dict().values())
        ),
    }
    for stage in ("unlearned", "continued"):
        print(f"{stage:>10}: U (forgotten) {summary[stage]['u_acc']:.3f}   R (retained) {summary[stage]['r_acc']:.3f}")
    print(f"FedAvg continued {a.num_rounds} rounds on the pruned model ({summary['params']:,} parameters): {final}")
    if a.summary:
        with open(a.summary, "w", encoding="utf-8") as fh:
            json.dump(summary, fh, indent=2)
    if not summary["changed"]:  # e.g. the sites sent numpy arrays, which the PyTorch Client API drops
        print(
            f"the global model did not change: no site result was used (see {result}/server/log.txt)", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
