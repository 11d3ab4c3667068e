"""An ordinary NVFlare Client API training script: receive the global model, train locally, send the weights back.

The only thing from nvflare-unlearn is the model class: ``UnlearnedModel(ckpt=...)`` builds the pruned
architecture (every site needs the same layer widths; the weights then come from the server each round). Each
site trains on its shard of scikit-learn's digits WITHOUT the classes the model was made to forget: training on
them again would teach them back.
"""

from __future__ import annotations

import argparse
import re

import numpy as np
import nvflare.client as flare
import torch
from torch import nn
from torch.utils.data import DataLoader

from nvflare_unlearn.data import digits_dataset, filter_classes
from nvflare_unlearn.method.export import UnlearnedModel


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", required=True, help="the unlearned model (for its architecture)")
    parser.add_argument("--n_sites", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.01)
    return parser.parse_args()


def site_shard(site: str, n_sites: int, forget: list[int]):
    """Every n-th training image of digits, starting at this site's number, minus the forgotten classes."""
    data = digits_dataset("train")
    index = int(re.search(r"(\d+)$", site).group(1)) - 1
    data = data.subset(np.arange(index, len(data), n_sites))
    return filter_classes(data, drop=forget) if forget else data


def main():
    args = parse_args()
    torch.set_num_threads(1)
    flare.init()
    model = UnlearnedModel(ckpt=args.ckpt)
    data = site_shard(flare.get_site_name(), args.n_sites, model.forget_classes)
    loss_fn = nn.CrossEntropyLoss()
    while flare.is_running():
        received = flare.receive()
        if received is None:
            break
        model.load_state_dict({k: torch.as_tensor(v) for k, v in received.params.items()})
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
        gen = torch.Generator().manual_seed(received.current_round or 0)
        model.train()
        steps = 0
        for _ in range(args.epochs):
            for images, labels in DataLoader(data, batch_size=32, shuffle=True, generator=gen):
                optimizer.zero_grad()
                loss_fn(model(images), labels).backward()
                optimizer.step()
                steps += 1
        params = {k: v.detach().cpu() for k, v in model.state_dict().items()}  # tensors: the PyTorch client API
        flare.send(flare.FLModel(params=params, meta={"NUM_STEPS_CURRENT_ROUND": steps}))


if __name__ == "__main__":
    main()
