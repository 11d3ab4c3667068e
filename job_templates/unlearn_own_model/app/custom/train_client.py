"""The user's NVFlare Client API training script, extended to answer nvflare-unlearn's four tasks.

An ordinary FedAvg client loop (receive the global model, train locally, send the weights back) plus three more
branches. Tasks arrive by name:

- ``train``: the user's own training loop, on this site's data WITHOUT the classes the server asks to forget; its
  loss is the unlearning method's objective when the method has one (``ua.training_objective``: distillation from
  the original model, or a forget-class term on this site's forget-class images), cross-entropy otherwise;
- ``validate``: per-class correct/total counts on this site's test shard (the server turns them into U/R accuracy);
- ``class_activations``: per-class activation statistics of the conv layers on this site's training data
  (sums and counts only: no image or label leaves the site);
- ``verify``: the forgetting check at the end of the job (loss histograms and feature moments, aggregates only).

Runs with NUMPY exchange (the recipes set it): the model is rebuilt every round from the factory + the pruning
plan that travels in the task's meta, because its layer widths shrink once pruned.
"""

from __future__ import annotations

import argparse
import zlib

import nvflare.client as flare
import torch
from my_data import NUM_CLASSES, load_site_data, only_classes, without_classes
from my_net import build_net
from torch import nn
from torch.utils.data import DataLoader

from nvflare_unlearn import enforce_masks
from nvflare_unlearn.fl import client_api as ua


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n_sites", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def train_locally(
    model: nn.Module, data, epochs: int, lr: float, batch_size: int, seed: int, masked: bool, objective=None
) -> int:
    """The user's own loop: SGD with momentum; cross-entropy, or the unlearning method's objective when given.
    Returns the number of samples trained on."""
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    cross_entropy = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        for images, labels in loader:
            optimizer.zero_grad()
            loss = objective.batch_loss(model, images, labels) if objective else cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            if masked:
                enforce_masks(model)  # prune_mode="mask": pruned channels stay at zero
    return len(data)


def main():
    args = parse_args()
    torch.set_num_threads(1)
    flare.init()
    site = flare.get_site_name()
    train_set, test_set = load_site_data(site, args.n_sites, seed=args.seed)

    while flare.is_running():
        received = flare.receive()
        if received is None:
            break
        # The factory + the plan in the meta + the global weights: the model as the server holds it this round.
        model = ua.model_from_flmodel(received, build_net, NUM_CLASSES)
        task = flare.get_task_name()
        if task == ua.TASK_ACTIVATIONS:
            loader = DataLoader(train_set, batch_size=64)
            flare.send(ua.activation_result(model, loader, NUM_CLASSES, received))
        elif task == ua.TASK_TRAIN:
            data = without_classes(train_set, ua.forget_classes_of(received))
            n = 0
            if len(data) and args.epochs:
                seed = args.seed + 1000 * (received.current_round or 0) + zlib.crc32(site.encode()) % 1000
                masked = ua.prune_mode_of(received) == "mask"
                forget = only_classes(train_set, ua.forget_classes_of(received))
                forget_loader = DataLoader(forget, batch_size=args.batch_size, shuffle=True) if len(forget) else None
                objective = ua.training_objective(received, build_net, NUM_CLASSES, forget_loader)
                n = train_locally(model, data, args.epochs, args.lr, args.batch_size, seed, masked, objective)
                flare.send(ua.weights_result(model, n, objective))  # the loss it minimised goes on the record
            else:
                flare.send(ua.weights_result(model, 0))  # n = 0: this site is left out of the average
        elif task == ua.TASK_VALIDATE:
            flare.send(ua.validation_result(model, DataLoader(test_set, batch_size=256), NUM_CLASSES))
        elif task == ua.TASK_VERIFY:
            train, test = DataLoader(train_set, batch_size=256), DataLoader(test_set, batch_size=256)
            flare.send(ua.verification_result(model, train, test, received, NUM_CLASSES))
        else:
            raise RuntimeError(f"unexpected task {task!r}")


if __name__ == "__main__":
    main()
