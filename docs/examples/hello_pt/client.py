"""Client side training script, in the shape of NVIDIA FLARE's hello-pt: the model, the loss and the optimizer are
built once at the top, every site reads the same data, an evaluate branch comes before training. This is the
script BEFORE the unlearning patch (unlearning.patch); as it is, it runs with NVIDIA's FedAvgRecipe (job.py).

Data: scikit-learn's bundled 8x8 digits (no download), a fixed 75/25 split.
"""

import argparse

import numpy as np
import nvflare.client as flare
import torch
from model import DigitsNet
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.optim import SGD
from torch.utils.data import DataLoader, TensorDataset


def load_data(seed=0):
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]  # N x 1 x 8 x 8, in [0, 1]
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(images, labels, test_size=0.25, random_state=seed)
    train = TensorDataset(torch.from_numpy(x_train), torch.from_numpy(y_train))
    return train, TensorDataset(torch.from_numpy(x_test), torch.from_numpy(y_test))


def evaluate(net, data_loader, device):
    correct, total = 0, 0
    with torch.no_grad():
        for images, labels in data_loader:
            predicted = net(images.to(device)).argmax(1)
            total += labels.size(0)
            correct += (predicted == labels.to(device)).sum().item()
    return 100.0 * correct / total


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args()
    torch.set_num_threads(1)

    model = DigitsNet()
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    loss = nn.CrossEntropyLoss()
    optimizer = SGD(model.parameters(), lr=args.lr, momentum=0.9)

    train_set, test_set = load_data()
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True)
    test_loader = DataLoader(test_set, batch_size=256)

    flare.init()
    client_name = flare.system_info()["site_name"]

    while flare.is_running():
        input_model = flare.receive()
        print(f"site = {client_name}, current_round = {input_model.current_round}")

        model.load_state_dict(input_model.params)
        model.to(device)
        accuracy = evaluate(model, test_loader, device)

        if flare.is_evaluate():
            flare.send(flare.FLModel(metrics={"accuracy": accuracy}))
            continue

        steps = args.epochs * len(train_loader)
        for _epoch in range(args.epochs):
            for images, labels in train_loader:
                images, labels = images.to(device), labels.to(device)
                optimizer.zero_grad()
                predictions = model(images)
                cost = loss(predictions, labels)
                cost.backward()
                optimizer.step()
        print(f"site = {client_name}: trained {args.epochs} epoch(s); accuracy before: {accuracy:.1f} %")

        params = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        meta = {"NUM_STEPS_CURRENT_ROUND": steps}
        flare.send(flare.FLModel(params=params, metrics={"accuracy": accuracy}, meta=meta))


if __name__ == "__main__":
    main()
