"""Pure decisions of the growth loop: what a stage tries and who wins.

Kept free of Ray so they can be tested with made-up trial results.
"""

from __future__ import annotations

from runner.config import StageConfig


def variant_label(variant: dict) -> str:
    """A short, stable, filesystem-safe name for a variant."""
    parts = [variant["op"]]
    for key in sorted(k for k in variant if k != "op"):
        parts.append(f"{key}={variant[key]}")
    return "-".join(parts).replace("/", "_").replace(" ", "")


def stage_variants(stage: StageConfig, index: int) -> list[dict]:
    """The variants a stage runs: a fresh model for the first stage, the
    configured ops for every later one."""
    if index == 0:
        return [{"op": "scratch", "model": stage.model}]
    return [dict(v) for v in stage.variants]


def best_epoch(epochs: list[dict]) -> dict:
    """The epoch a trial is judged by: its best validation accuracy; among
    equals the earliest (it cost less)."""
    return max(epochs, key=lambda e: (e["val_acc"], -e["epoch"]))


def select_winner(trials: list[dict]) -> dict:
    """Best validation accuracy wins; ties go to the trial that spent less
    compute (training FLOPs up to its best epoch). Only ``val_acc`` and the
    ledger are read: the test set never enters the choice."""
    finished = sorted((t for t in trials if t.get("epochs")), key=lambda t: t["name"])
    if not finished:
        raise ValueError("no trial of this stage reported any epoch")
    # max() keeps the first of equals, so full ties fall to the first name.
    return max(finished, key=lambda t: (t["best"]["val_acc"], -t["best"]["flops"]))
