"""Train a tiny segmentation head on DiffSeg pseudo-labels, on CPU, for a few steps.

    python examples/train_on_pseudo_labels.py LABELS IMAGES [--steps 20] [--size 96]

DiffSeg segment ids are *not classes*: segment 3 of one image has nothing to do
with segment 3 of another. So this does not train a classifier with
cross-entropy on the ids. It trains a per-pixel *embedding* with a
discriminative loss (De Brabandere et al., 2017): pixels of one segment are
pulled towards their segment's mean embedding, and the means of different
segments of the same image are pushed apart. Any segment ids work, in any
order. The embeddings can then be clustered per image (k-means) into segments,
or used as features for a small labelled set.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.utils.data import DataLoader

from pipeline.after.reader import PseudoLabelDataset


class TinyHead(nn.Module):
    """Two conv layers: 3 -> 32 features (3x3), -> ``dim``-d embedding per pixel (1x1)."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def discriminative_loss(emb: torch.Tensor, labels: torch.Tensor, pull_margin: float = 0.5,
                        push_margin: float = 1.5) -> torch.Tensor:
    """emb (B, D, H, W), labels (B, H, W) segment ids -> scalar loss (mean over images)."""
    losses = []
    for e, lab in zip(emb, labels):
        e = e.flatten(1).T  # (HW, D)
        ids, inverse = torch.unique(lab.flatten(), return_inverse=True)
        onehot = torch.nn.functional.one_hot(inverse, len(ids)).float()  # (HW, K)
        means = (onehot.T @ e) / onehot.sum(0, keepdim=True).T  # (K, D)
        pull = torch.relu((e - means[inverse]).norm(dim=1) - pull_margin).pow(2).mean()
        if len(ids) > 1:
            dist = torch.cdist(means, means)
            off = ~torch.eye(len(ids), dtype=torch.bool)
            push = torch.relu(2 * push_margin - dist[off]).pow(2).mean()
        else:
            push = e.new_zeros(())
        losses.append(pull + push + 1e-3 * means.norm(dim=1).mean())
    return torch.stack(losses).mean()


def is_logged(step: int, steps: int) -> bool:
    """The steps that print a line: the first, every 5th and the last."""
    return step == 1 or step % 5 == 0 or step == steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("labels", help="output folder of `diffseg label`")
    p.add_argument("images", help="the input folder the labels were made from")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=96, help="train at size x size (centre crop + resize)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--lr", type=float, default=1e-2)
    args = p.parse_args(argv)

    torch.manual_seed(0)
    dataset = PseudoLabelDataset(args.labels, args.images, size=args.size)
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)
    model = TinyHead()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    step, start = 0, time.time()
    while step < args.steps:
        seen = 0
        for images, labels in loader:  # one pass = one epoch; loop until enough steps
            loss = discriminative_loss(model(images * 2 - 1), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            seen += len(images)
            if is_logged(step, args.steps):
                print(f"step {step:3d}  loss {loss.item():.4f}  ({time.time() - start:.1f} s)")
            if step == args.steps:
                break
        if seen == 0:
            raise SystemExit("no labelled image to train on")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
