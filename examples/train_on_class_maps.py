"""Train a tiny semantic segmentation head with cross-entropy on class maps, on CPU, for a few steps.

    diffseg label IMAGES LABELS --vocabulary "person,dog,grass,sky"     # class maps need a vocabulary
    python examples/train_on_class_maps.py LABELS IMAGES [--steps 20] [--size 96]

Labels made with ``--vocabulary`` carry a class map per image: the vocabulary
index of each pixel's segment, the same class in every image, 255 where the
segment's class is unknown. Unlike segment ids (see train_on_pseudo_labels.py),
these are classes, so a plain per-pixel classifier trains on them with
cross-entropy; unknown pixels are ignored (``ignore_index=255``).
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.utils.data import DataLoader

from pipeline.after.reader import PseudoLabelDataset
from pipeline.data.label_files import vocabulary_names
from pipeline.data.schema import UNKNOWN_CLASS


def classifier(num_classes: int) -> nn.Module:
    """Three conv layers: RGB -> 32 -> 32 features (3x3) -> one logit per class and pixel (1x1)."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, num_classes, 1),
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("labels", help="output folder of `diffseg label --vocabulary ...`")
    p.add_argument("images", help="the input folder the labels were made from")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=96, help="train at size x size (centre crop + resize)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--lr", type=float, default=1e-2)
    args = p.parse_args(argv)

    names = vocabulary_names(args.labels)
    if names is None:
        raise SystemExit(f"{args.labels} has no class maps: label with --vocabulary first")
    torch.manual_seed(0)
    dataset = PseudoLabelDataset(args.labels, args.images, size=args.size, target="class_map")
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)
    model = classifier(len(names))
    loss_fn = nn.CrossEntropyLoss(ignore_index=UNKNOWN_CLASS)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    print(f"{len(names)} classes: {', '.join(names)}")
    step, start = 0, time.time()
    pixels = torch.zeros(len(names) + 1, dtype=torch.long)  # per class, then unknown
    while step < args.steps:
        seen = 0
        for images, classes in loader:  # (B, 3, S, S) in [0, 1], (B, S, S) class indices, 255 unknown
            pixels += torch.bincount(classes.clamp(max=len(names)).flatten(), minlength=len(names) + 1)
            if bool((classes == UNKNOWN_CLASS).all()):
                continue  # nothing to learn from a batch of unknown pixels only
            loss = loss_fn(model(images * 2 - 1), classes)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            seen += len(images)
            if step == 1 or step % 5 == 0 or step == args.steps:
                print(f"step {step:3d}  loss {loss.item():.4f}  ({time.time() - start:.1f} s)")
            if step == args.steps:
                break
        if seen == 0:
            raise SystemExit("no labelled pixel with a known class to train on")
    share = pixels.float() / pixels.sum()
    print("pixels seen per class: " + ", ".join(
        f"{n} {100 * s:.1f}%" for n, s in zip([*names, "unknown"], share.tolist()) if s > 0))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
