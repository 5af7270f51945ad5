"""Score a checkpoint on a split of the shards: accuracy, per class, confusion.

Runs in the calling process with plain pyarrow reads: the 2,000 test images
take a few seconds on one core, and nothing here needs a cluster.
"""

from __future__ import annotations

import re
import tempfile

import numpy as np
import pyarrow.parquet as pq
import torch

from runner import storage
from runner.data.pipeline import decode_pixels, eval_view, split_mask
from runner.errors import RunnerError
from runner.model import build_model
from runner.model.checkpoint import load_checkpoint

BATCH = 256


def load_split(manifest: dict, split: str, val_fraction: float = 0.1,
               limit: int | None = None):
    """Pixels (N, base, base, 3) and labels of "test", "val" or "train"; with
    ``limit``, only the first ``limit`` rows (and only the shards they need)."""
    loc = storage.resolve(manifest["location"])
    source = "test" if split == "test" else "train"
    pixels, labels = [], []
    for rel in manifest["shards"][source]:
        table = pq.read_table(loc.join(rel).path, filesystem=loc.fs,
                              columns=["image", "label", "fold"])
        if split != "test":
            table = table.filter(split_mask(table["fold"], split, val_fraction))
        pixels.append(decode_pixels(table["image"].combine_chunks(),
                                    manifest["base_size"]))
        labels.append(table["label"].to_numpy())
        if limit is not None and sum(map(len, labels)) >= limit:
            break
    return np.concatenate(pixels)[:limit], np.concatenate(labels)[:limit]


@torch.no_grad()
def predict_proba(model, pixels: np.ndarray, image_size: int) -> np.ndarray:
    """P(class 1) per image, in batches."""
    model.eval()
    out = []
    for i in range(0, len(pixels), BATCH):
        x = eval_view(pixels[i:i + BATCH], image_size)
        out.append(torch.sigmoid(model(x).squeeze(1)).numpy())
    return np.concatenate(out) if out else np.zeros(0)


def score(probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict:
    pred = (probs > 0.5).astype(int)
    confusion = np.zeros((len(classes), len(classes)), dtype=int)
    np.add.at(confusion, (labels.astype(int), pred), 1)
    per_class = {c: float(confusion[i, i] / max(confusion[i].sum(), 1))
                 for i, c in enumerate(classes)}
    return {"accuracy": float((pred == labels).mean()) if len(labels) else 0.0,
            "images": int(len(labels)), "per_class": per_class,
            "confusion": confusion.tolist(), "classes": classes}


def load_model(spec, state: dict, checkpoint: str) -> torch.nn.Module:
    """The spec's model holding ``state``, in eval mode. Weights that pass
    :func:`runner.model.check_compatible` can still be refused by torch (a
    sparse or quantized tensor of the right shape): RunnerError naming the
    checkpoint then, never torch's multi-line traceback."""
    model = build_model(spec)
    try:
        model.load_state_dict(state)
    except (RuntimeError, ValueError) as err:
        raise RunnerError(f"checkpoint {checkpoint}: weights do not fit spec "
                          f"{spec.name!r}: {_why_not_loaded(err)}") from err
    return model.eval()


def _why_not_loaded(err: Exception) -> str:
    """One line from load_state_dict's multi-line message: the tensor and
    torch's reason when it names them, else its first detail line."""
    text = str(err)
    found = re.search(r'parameter named "([^"]+)"[^\n]*?exception occurred : '
                      r"\((['\"])(.+?)\2,?\)", text)
    if found:
        return f"{found.group(1)}: {found.group(3).rstrip('.!')}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[1] if len(lines) > 1 else lines[0] if lines
            else type(err).__name__)[:300]


def evaluate_checkpoint(checkpoint: str, manifest: dict, split: str = "test",
                        image_size: int = 64, val_fraction: float = 0.1) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        local = storage.download_dir(storage.resolve(checkpoint), tmp)
        spec, state, _ = load_checkpoint(local)
    model = load_model(spec, state, checkpoint)
    pixels, labels = load_split(manifest, split, val_fraction)
    return score(predict_proba(model, pixels, image_size), labels, manifest["classes"])
