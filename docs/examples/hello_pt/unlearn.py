"""The unlearning job for the patched hello-pt script (apply unlearning.patch first): the team's own model and
client.py, with nvflare-unlearn's UnlearningRecipe instead of FedAvgRecipe, in the simulator.

    python job.py                                   # the existing FedAvg job: FL_global_model.pt
    git apply unlearning.patch                      # the few-line change to client.py and model.py
    python unlearn.py                               # --initial-ckpt: job.py's FL_global_model.pt by default

Prints U (accuracy on the forgotten digit) and R (the others) before and after; exits 1 when U did not fall below
--max-u or R fell by more than --max-r-drop.
"""

import argparse
import json
import os
import sys

from model import DigitsNet
from nvflare.recipe import SimEnv

from nvflare_unlearn.fl import UnlearningRecipe, quiet_log_config, read_job_result

FEDAVG_MODEL = "/tmp/hello_pt_digits/hello-pt-digits/server/simulate_job/app_server/FL_global_model.pt"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--initial-ckpt", default=FEDAVG_MODEL, help="the trained model (job.py's by default)")
    parser.add_argument("--forget-class", type=int, default=3)
    parser.add_argument("--n_clients", type=int, default=2)
    parser.add_argument("--num_rounds", type=int, default=2, help="fine-tuning rounds after pruning")
    parser.add_argument("--workspace", default="/tmp/hello_pt_unlearn")
    parser.add_argument("--max-u", type=float, default=0.05)
    parser.add_argument("--max-r-drop", type=float, default=0.05)
    parser.add_argument("--summary", help="also write the numbers as JSON to this file")
    args = parser.parse_args()
    ckpt, workspace = os.path.abspath(args.initial_ckpt), os.path.abspath(args.workspace)
    os.chdir(os.path.dirname(os.path.abspath(__file__)))  # train_script is relative to this folder

    recipe = UnlearningRecipe(
        name="hello-pt-unlearn",
        model=DigitsNet,  # the factory, DigitsNet(num_classes=10), recorded by import path: "model:DigitsNet"
        initial_ckpt=ckpt,
        forget_classes=[args.forget_class],
        num_rounds=args.num_rounds,
        num_clients=args.n_clients,
        train_script="client.py",
        train_args="--epochs 1 --lr 0.01",
    )
    env = SimEnv(num_clients=args.n_clients, workspace_root=workspace, log_config=quiet_log_config(workspace))
    m = read_job_result(recipe.execute(env).get_result()).metrics
    for stage in ("original", "pruned", "unlearned"):
        print(f"{stage:>9}: U (forgotten) {m[stage]['u_acc']:.3f}   R (retained) {m[stage]['r_acc']:.3f}")
    print(f"parameters: {m['params_before']:,} -> {m['params_after']:,}; objective: {m['objective']}")
    ok = m["unlearned"]["u_acc"] <= args.max_u and m["unlearned"]["r_acc"] >= m["original"]["r_acc"] - args.max_r_drop
    if args.summary:
        with open(args.summary, "w") as f:
            json.dump({**{k: m[k] for k in ("original", "pruned", "unlearned", "objective", "rounds")}, "ok": ok}, f)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
