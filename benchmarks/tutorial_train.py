"""The implicit-layers tutorial's own CIFAR-10 training (chapter 4), epoch by epoch, to set
beside ``python -m deqlab experiment=cifar_tutorial`` on the same card.

    python -m benchmarks.tutorial_train --data DIR [--epochs 50] [--max-seconds S] --out F.json

The tutorial's model (conv 3->48 with bias, BatchNorm, its DEQFixedPoint around the ResNet
cell, BatchNorm, 8x8 average pooling, a linear head), its layer and Anderson
(benchmarks/baseline.py: tol 1e-2, 25 iterations, m=5), Adam 1e-3 with the cosine schedule
over all 50 epochs stepped every batch, batch 100, and its test pass after every epoch. The
images come through deqlab's CIFAR-10 DataModule with the experiment's settings (ToTensor
pixels, no augmentation, the 50,000 training images in a shuffled order). ``--max-seconds``
stops before an epoch that would not finish in time; the schedule stays the 50 epochs'.
Writes the test accuracy, training loss and seconds of every finished epoch.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from .baseline import tutorial_sequential


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", required=True)
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--max-seconds", type=float, default=float("inf"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit-batches", type=int, default=None, help="per epoch (smoke runs)")
    args = ap.parse_args()

    import hydra.utils

    from deqlab.runner.config import compose
    from deqlab.tasks.cifar.model import ResNetCell

    cfg = compose(
        ["experiment=cifar_tutorial", f"paths.data_dir={args.data}"], "/tmp/tutorial-train"
    )
    datamodule = hydra.utils.instantiate(cfg.task.datamodule)
    datamodule.setup("fit")
    train_loader, test_loader = datamodule.make_train_loader(), datamodule.test_dataloader()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    chan = 48
    f = ResNetCell(chan, 64, groups=8)  # the tutorial's ResNetLayer (tests/test_parity.py)
    model = tutorial_sequential(f, chan).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, args.epochs * len(train_loader), eta_min=1e-6
    )
    epochs: list[dict] = []
    start = time.perf_counter()
    for epoch in range(args.epochs):
        last = epochs[-1]["seconds"] if epochs else 0.0
        if time.perf_counter() - start + last > args.max_seconds:
            break
        t0 = time.perf_counter()
        model.train()
        total_loss, n = 0.0, 0
        for i, (x, y) in enumerate(train_loader):
            if i == args.limit_batches:
                break
            x, y = x.to(device), y.to(device)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            scheduler.step()
            total_loss += float(loss) * len(y)
            n += len(y)
        model.eval()
        right = total = 0
        with torch.no_grad():
            for i, (x, y) in enumerate(test_loader):
                if i == args.limit_batches:
                    break
                x, y = x.to(device), y.to(device)
                right += int((model(x).argmax(1) == y).sum())
                total += len(y)
        epochs.append(
            {
                "epoch": epoch,
                "train_loss": total_loss / n,
                "test_acc": right / total,
                "seconds": time.perf_counter() - t0,
            }
        )
        print(json.dumps(epochs[-1]), flush=True)
    with open(args.out, "w") as fh:
        json.dump({"device": str(device), "epochs": epochs}, fh, indent=1)


if __name__ == "__main__":
    main()
