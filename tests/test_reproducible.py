"""The same job with the same seed makes the same choices: the same views of
the same images in the same order, the same first weights, the same winners."""

import numpy as np
import pyarrow as pa

from runner.config import AugmentConfig, load_job
from runner.data.pipeline import ViewBatch
from runner.growth.loop import grow

BASE, SIZE = 72, 64


def shard_batch(n=8) -> pa.Table:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (n, BASE, BASE, 3), dtype=np.uint8)
    return pa.table({"image": [p.tobytes() for p in pixels],
                     "label": list(range(n)), "fold": [50] * n,
                     "path": [f"training_set/cats/{i}.jpg" for i in range(n)]})


def views(seed, pass_index=0):
    make = ViewBatch("train", 0.1, BASE, SIZE, AugmentConfig(), seed=seed,
                     pass_index=pass_index)
    return make(shard_batch())["image"]


def test_a_seeded_batch_gets_the_same_views_in_any_worker():
    assert np.array_equal(views(seed=3), views(seed=3))


def test_each_pass_and_each_seed_gets_fresh_views():
    assert not np.array_equal(views(seed=3), views(seed=3, pass_index=1))
    assert not np.array_equal(views(seed=3), views(seed=4))


def test_an_unseeded_batch_draws_from_os_entropy():
    assert not np.array_equal(views(seed=None), views(seed=None))


def small_job(root, data):
    return load_job("jobs/cats_dogs.yaml", [
        f"storage={root}", f"data.root={data}", "train.batch_size=16",
        "baseline=false", "seed=7",
        "stages=[{name: seed, model: classifier_1, epochs: 1},"
        " {name: grow, epochs: 2, variants: [{op: deepen_block},"
        " {op: plain_copy, to: classifier_2}]}]"])


def choices(lineage: dict) -> list:
    """What a run decided and every number its decisions rested on."""
    return [(s["name"], s["winner"],
             [(t["name"], t["status"],
               [(e["epoch"], e["train_loss"], e["val_acc"]) for e in t["epochs"]])
              for t in s["trials"]])
            for s in lineage["stages"]]


def test_the_same_seed_reproduces_the_lineage(tmp_path, cats_dogs_subset, ray_local):
    first = grow(small_job(tmp_path / "first", cats_dogs_subset))
    second = grow(small_job(tmp_path / "second", cats_dogs_subset))
    assert choices(first) == choices(second)
    assert [s["test"]["accuracy"] for s in first["stages"]] == \
        [s["test"]["accuracy"] for s in second["stages"]]
