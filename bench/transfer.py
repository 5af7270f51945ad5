"""How much of what classifier_1 learned survives each way of growing it.

Trains classifier_1 on the real training split for a few epochs, then grows
it into a deeper network with every transfer kind and prints the test
accuracy (2,000 test images) right after the transfer and after each of the
next epochs:

    deepen_conv   identity conv inserted after the first conv (function-preserving)
    deepen_block  identity conv + max-pool block, dense weights pooled to fit
    plain_copy    classifier_2, copying what fits by position (the original's way)
    fresh         classifier_2 from random weights

Single process, no Ray: the point is the transfer, not the plumbing. Pixels
are decoded once (ingest), augmentation is the job's own.

    .venv/bin/python bench/transfer.py [--parent-epochs 3] [--epochs 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from runner.config import AugmentConfig
from runner.data.ingest import ingest
from runner.data.pipeline import random_affines, resample
from runner.evaluate import load_split, predict_proba, score
from runner.model import build_model, classifier_1, classifier_2
from runner.model.growth import apply_op

KINDS = {
    "deepen_conv": dict(op="deepen_conv", block=0, after_layer=0),
    "deepen_block": dict(op="deepen_block"),
    "plain_copy": dict(op="plain_copy", target_spec=classifier_2()),
    "fresh": dict(op="fresh", target_spec=classifier_2()),
}


def train_epoch(model, opt, pixels, labels, rng, batch=128):
    model.train()
    order = rng.permutation(len(labels))
    aug = AugmentConfig()
    for i in range(0, len(order), batch):
        idx = order[i:i + batch]
        views = resample(pixels[idx], random_affines(len(idx), aug, rng), 64)
        x = torch.from_numpy(views).float().div_(255)
        x = x.contiguous(memory_format=torch.channels_last)
        y = torch.from_numpy(labels[idx]).float()
        loss = F.binary_cross_entropy_with_logits(model(x).squeeze(1), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def test_acc(model, test) -> float:
    pixels, labels = test
    return score(predict_proba(model, pixels, 64), labels, ["cats", "dogs"])["accuracy"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/datasets/cats_dogs")
    p.add_argument("--parent-epochs", type=int, default=3)
    p.add_argument("--epochs", type=int, default=2, help="epochs after the transfer")
    p.add_argument("--lr", type=float, default=1e-3)
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    print(f"$ {' '.join(sys.argv)}   ({os.cpu_count()} CPUs)")

    with tempfile.TemporaryDirectory() as tmp:
        manifest = dict(ingest(args.data, tmp), location=tmp)
        train = load_split(manifest, "train")
        test = load_split(manifest, "test")
    rng = np.random.default_rng(0)

    parent_spec = classifier_1()
    parent = build_model(parent_spec).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(parent.parameters(), lr=args.lr)
    t0 = time.perf_counter()
    for epoch in range(args.parent_epochs):
        train_epoch(parent, opt, *train, rng)
        print(f"parent classifier_1 epoch {epoch + 1}: test acc "
              f"{test_acc(parent, test):.4f}  ({time.perf_counter() - t0:.0f} s)")
    parent_acc = test_acc(parent, test)
    state = {k: v.clone() for k, v in parent.state_dict().items()}

    rows = []
    for kind, params in KINDS.items():
        params = dict(params)
        child_spec, child_state, report = apply_op(parent_spec, state,
                                                   params.pop("op"), **params)
        child = build_model(child_spec)
        child.load_state_dict(child_state)
        child = child.to(memory_format=torch.channels_last)
        accs = [test_acc(child, test)]
        opt = torch.optim.Adam(child.parameters(), lr=args.lr)
        for _ in range(args.epochs):
            train_epoch(child, opt, *train, rng)
            accs.append(test_acc(child, test))
        counts = report.counts()
        rows.append((kind, child_spec.name, counts, accs))
        print(f"{kind:<13} " + "  ".join(f"{a:.4f}" for a in accs))

    print(f"\nparent classifier_1 after {args.parent_epochs} epochs: "
          f"test acc {parent_acc:.4f}")
    header = "  ".join(["after"] + [f"+{e} ep" for e in range(1, args.epochs + 1)])
    print(f"{'transfer':<13} {'child':<22} {header}   tensors (copied/morphed/fresh)")
    for kind, name, counts, accs in rows:
        cells = "  ".join(f"{a:.4f}" for a in accs)
        print(f"{kind:<13} {name[:22]:<22} {cells}   {counts}")


if __name__ == "__main__":
    main()
