"""The team's existing FedAvg job, NVIDIA FLARE's way (hello-pt's job.py shape): NVIDIA's FedAvgRecipe runs the
unpatched client.py in the simulator. Its FL_global_model.pt is the model unlearn.py then makes forget a class.

    python job.py                      # 2 sites, 3 rounds; prints where FL_global_model.pt is
"""

import argparse
import os

from model import DigitsNet
from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe
from nvflare.recipe import SimEnv


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n_clients", type=int, default=2)
    parser.add_argument("--num_rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workspace", default="/tmp/hello_pt_digits")
    args = parser.parse_args()
    os.chdir(os.path.dirname(os.path.abspath(__file__)))  # train_script is relative to this folder

    recipe = FedAvgRecipe(
        name="hello-pt-digits",
        min_clients=args.n_clients,
        num_rounds=args.num_rounds,
        model=DigitsNet(),
        train_script="client.py",
        train_args=f"--epochs {args.epochs}",
    )
    run = recipe.execute(SimEnv(num_clients=args.n_clients, workspace_root=args.workspace))
    print("Job Status is:", run.get_status())
    print("Result can be found in:", run.get_result())
    print("Global model:", os.path.join(run.get_result(), "server", "simulate_job", "app_server", "FL_global_model.pt"))


if __name__ == "__main__":
    main()
