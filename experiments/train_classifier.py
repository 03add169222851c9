"""Train the Fashion-MNIST classifier whose features score FID and KID, and save its weights.

    python -m collafuse.experiments.train_classifier [--epochs N] [--out PATH]

Trains `FeatureNet` on the 60,000 training images in the model range [-1, 1] (28 x 28 grey),
reports accuracy on the 10,000 test images, and writes the state dict plus a small record
(accuracy, epochs, feature width, training time) to `common/assets/fmnist_classifier.pt`, the file
`load_feature_net()` reads. Sized for 2 CPU cores: a few minutes at the default 5 epochs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from collafuse.common.config import ImageConfig
from collafuse.common.data import DataError, load_fashion_mnist, to_model_range
from collafuse.common.metrics import (
    ASSET_PATH,
    ClassifierMeta,
    FeatureNet,
    classifier_accuracy,
    save_feature_net,
)

GREY_28 = ImageConfig(channels=1, size=28)


def train(
    epochs: int,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    threads: int = 2,
    limit: int | None = None,
) -> tuple[FeatureNet, ClassifierMeta]:
    """Train a fresh FeatureNet; returns it in eval mode with its test accuracy recorded.

    `limit` keeps only the first `limit` training and test images (a smoke test, not a model).
    """
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    train_images, train_labels = load_fashion_mnist(split="train")
    test_images, test_labels = load_fashion_mnist(split="test")
    if limit is not None:
        train_images, train_labels = train_images[:limit], train_labels[:limit]
        test_images, test_labels = test_images[:limit], test_labels[:limit]
    x_train = to_model_range(train_images, GREY_28)  # (60000, 1, 28, 28) in [-1, 1]
    y_train = torch.from_numpy(train_labels)
    x_test = to_model_range(test_images, GREY_28)
    y_test = torch.from_numpy(test_labels)

    net = FeatureNet()
    steps_per_epoch = (x_train.shape[0] + batch_size - 1) // batch_size
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch
    )
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        net.train()
        order = torch.randperm(x_train.shape[0], generator=generator)
        loss_sum, seen = 0.0, 0
        for step in range(steps_per_epoch):
            index = order[step * batch_size : (step + 1) * batch_size]
            x, y = x_train[index], y_train[index]
            # Horizontal flips: garments are left-right symmetric in meaning.
            flip = torch.rand(x.shape[0], generator=generator) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            loss = F.cross_entropy(net(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum += loss.detach().item() * x.shape[0]
            seen += x.shape[0]
            if (step + 1) % 100 == 0:
                print(
                    f"epoch {epoch}/{epochs} step {step + 1}/{steps_per_epoch} "
                    f"loss {loss_sum / seen:.4f} ({time.perf_counter() - start:.0f}s)",
                    flush=True,
                )
        accuracy = classifier_accuracy(net, x_test, y_test)
        print(
            f"epoch {epoch}/{epochs}: train loss {loss_sum / seen:.4f}, "
            f"test accuracy {accuracy:.4f} ({time.perf_counter() - start:.0f}s)",
            flush=True,
        )
    seconds = time.perf_counter() - start
    net.eval()
    meta = ClassifierMeta(
        test_accuracy=classifier_accuracy(net, x_test, y_test),
        epochs=epochs,
        feature_dim=net.feature_dim,
        num_classes=net.num_classes,
        widths=net.widths,
        train_seconds=round(seconds, 1),
    )
    net.meta = meta
    return net, meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m collafuse.experiments.train_classifier",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--epochs", type=int, default=5, help="passes over the training set")
    parser.add_argument("--out", type=Path, default=ASSET_PATH, help="where to write the weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--limit", type=int, default=None, help="use only the first N images (smoke test)"
    )
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    try:
        net, meta = train(args.epochs, seed=args.seed, threads=args.threads, limit=args.limit)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    save_feature_net(net, meta, args.out)
    size = args.out.stat().st_size
    print(
        f"test accuracy {meta.test_accuracy:.4f} after {meta.epochs} epochs in "
        f"{meta.train_seconds:.0f}s; wrote {args.out} ({size / 1024:.0f} KiB)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
