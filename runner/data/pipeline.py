"""Shards -> Ray Data datasets that feed the trainers.

Augmentation runs in ``map_batches`` tasks that Ray places on any node, on
pixels decoded once at ingest (no JPEG decode per epoch). Each image gets its
own random view: mirror, zoom (a random crop of the base image), rotation,
shear and shift are folded into one affine matrix per image, and a whole
batch is resampled in a single ``grid_sample`` call. That is as expressive as
running torchvision's v2 RandomResizedCrop/RandomAffine/RandomHorizontalFlip
per sample, and several times cheaper than looping over images, because v2's
batched call draws one set of parameters for the whole batch.

Evaluation uses the same resampling with the identity matrix (the whole base
image scaled to ``image_size``), so train and eval views differ only by the
random part. Batches leave the workers as uint8 (N, 3, S, S); the trainer
scales to [0, 1], which keeps object-store traffic at a quarter of float32.

Nothing is materialised: every pass over a dataset re-runs the augmentation,
so each epoch (and each extra view) sees fresh random views, and memory is
bounded by Ray Data's streaming window, not by the epoch.
"""

from __future__ import annotations

import hashlib
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from ray.data._internal.execution.execution_callback import ExecutionCallback

from runner.config import AugmentConfig

def split_mask(fold: pa.Array, split: str, val_fraction: float) -> pa.Array:
    """Rows of training_set that belong to ``split`` ("train" or "val").

    The fold column is a stable hash of the path, so the validation split is
    the same in every run and never overlaps the training rows.
    """
    cut = round(100 * val_fraction)
    if split == "val":
        return pc.less(fold, cut)
    return pc.greater_equal(fold, cut)


def count_rows(shard_paths: list[str], filesystem, split: str,
               val_fraction: float) -> int:
    """Rows of ``split`` in training_set shards, from their fold column only."""
    import pyarrow.parquet as pq

    folds = pq.read_table(shard_paths, filesystem=filesystem, columns=["fold"])
    return pc.sum(split_mask(folds["fold"], split, val_fraction)).as_py() or 0


def decode_pixels(column: pa.Array, base_size: int) -> np.ndarray:
    """Binary column of HWC uint8 images -> (N, base, base, 3) uint8 array."""
    flat = bytearray().join(column.to_pylist())  # writable, so torch may wrap it
    return np.frombuffer(flat, dtype=np.uint8).reshape(-1, base_size, base_size, 3)


def random_affines(n: int, cfg: AugmentConfig,
                   rng: np.random.Generator) -> torch.Tensor:
    """One random 2x3 sampling matrix per image (output -> input coordinates)."""
    # Zoom: the crop covers a random fraction of the base image's area.
    side = np.sqrt(rng.uniform(1.0 - cfg.zoom, 1.0, n))
    angle = np.deg2rad(rng.uniform(-cfg.rotation, cfg.rotation, n))
    shear = rng.uniform(-cfg.shear, cfg.shear, n)
    flip = np.where(cfg.flip & (rng.random(n) < 0.5), -1.0, 1.0)
    # Shift the crop anywhere inside the base image.
    tx = rng.uniform(-1.0, 1.0, n) * (1.0 - side)
    ty = rng.uniform(-1.0, 1.0, n) * (1.0 - side)

    cos, sin = np.cos(angle), np.sin(angle)
    theta = np.zeros((n, 2, 3), dtype=np.float32)
    # rotation @ shear @ (scale * flip), applied to output coordinates
    theta[:, 0, 0] = side * flip * cos
    theta[:, 0, 1] = side * (cos * shear - sin)
    theta[:, 1, 0] = side * flip * sin
    theta[:, 1, 1] = side * (sin * shear + cos)
    theta[:, 0, 2] = tx
    theta[:, 1, 2] = ty
    return torch.from_numpy(theta)


def resample(pixels: np.ndarray, theta: torch.Tensor, size: int) -> np.ndarray:
    """Warp (N, H, W, 3) uint8 images by ``theta`` into (N, 3, size, size) uint8."""
    # Channels first while still uint8: transposing the float copy instead
    # costs five times as much, and grid_sample is slower on channels-last.
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous().float()
    # Reflection keeps rotated corners filled with image content, as Keras'
    # "nearest"/"reflect" fill modes do, instead of black wedges.
    out = F.grid_sample(x, sampling_grid(theta, size), mode="bilinear",
                        padding_mode="reflection", align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8).numpy()


def sampling_grid(theta: torch.Tensor, size: int) -> torch.Tensor:
    """``F.affine_grid(theta, (N, C, size, size), align_corners=False)``,
    computed as two multiply-adds per pixel: affine_grid's batched matrix
    product with an inner size of 3 took a third of the augmentation's time."""
    centres = (torch.arange(size, dtype=torch.float32) * 2 + 1) / size - 1
    xs, ys = centres.view(1, 1, size), centres.view(1, size, 1)
    t = theta.view(-1, 6, 1, 1)
    grid = torch.empty(len(theta), size, size, 2)
    for axis in (0, 1):  # x, then y, of the input point for each output pixel
        a, b, c = t[:, 3 * axis], t[:, 3 * axis + 1], t[:, 3 * axis + 2]
        torch.add(a * xs, b * ys, out=grid[..., axis]).add_(c)
    return grid


def identity_affines(n: int) -> torch.Tensor:
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    return theta


class ViewBatch:
    """``map_batches`` function: filter a split, then make one view per image.

    With a ``seed``, each batch draws its views from a generator keyed by the
    seed, the pass over the data and the images in the batch, so the same job
    seed gives the same views in every run (whichever worker process gets the
    batch), and every pass different ones. Without, views come from OS
    entropy.
    """

    def __init__(self, split: str, val_fraction: float, base_size: int,
                 image_size: int, augment: AugmentConfig | None,
                 seed: int | None = None, pass_index: int = 0):
        self.split, self.val_fraction = split, val_fraction
        self.base_size, self.image_size = base_size, image_size
        self.augment = augment
        self.seed, self.pass_index = seed, pass_index
        torch.set_num_threads(1)  # one core per augmentation worker

    def _rng(self, table: pa.Table) -> np.random.Generator:
        if self.seed is None:
            return np.random.default_rng()
        names = "\0".join(table["path"].to_pylist()).encode()
        batch = int.from_bytes(hashlib.blake2b(names, digest_size=8).digest(), "big")
        return np.random.default_rng([self.seed, self.pass_index, batch])

    def __call__(self, table: pa.Table) -> dict:
        if self.split in ("train", "val"):
            table = table.filter(split_mask(table["fold"], self.split,
                                            self.val_fraction))
        pixels = decode_pixels(table["image"].combine_chunks(), self.base_size)
        n = len(pixels)
        if n == 0:  # no row of this split in the slice
            return {"image": np.empty((0, 3, self.image_size, self.image_size), np.uint8),
                    "label": np.empty(0, np.float32)}
        theta = (random_affines(n, self.augment, self._rng(table)) if self.augment
                 else identity_affines(n))
        return {"image": resample(pixels, theta, self.image_size),
                "label": table["label"].to_numpy().astype(np.float32)}


def eval_view(pixels: np.ndarray, image_size: int) -> torch.Tensor:
    """The deterministic view used for validation, test and prediction: float
    (N, 3, S, S) in [0, 1]."""
    out = resample(pixels, identity_affines(len(pixels)), image_size)
    return torch.from_numpy(out).float().div_(255)


def build_dataset(shard_paths: list[str], filesystem, split: str, *,
                  val_fraction: float, base_size: int, image_size: int,
                  augment: AugmentConfig | None, batch_size: int = 256,
                  task_cpus: float = 0.5, max_tasks: int = 1, passes: int = 1,
                  seed: int | None = None):
    """A lazy Ray Dataset of {"image": uint8 (3,S,S), "label": float} rows.

    ``split`` is "train" or "val" (both read training_set shards) or "test".
    ``augment`` None gives the deterministic eval view. ``passes`` chains that
    many passes over the shards into one stream, in order: a trainer reads a
    whole trial's epochs from it without the stall of starting a new stream
    at each epoch, and the stream works ahead while the trainer validates.

    The stream is a single operator: one input row per (pass, shard), and a
    task that reads its shard once and yields its views ``batch_size`` images
    at a time. So the tasks run in the order the trainers need them: passes
    chained as separate read + map branches (a union) ran side by side and
    split the augmentation CPUs between the epoch being trained and the ones
    after it, which left the trainers waiting in every epoch but the last.
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    # In order, so a seeded run sees the same images in the same order.
    ctx.execution_options.preserve_order = True
    if PacedScheduling not in ctx.custom_execution_callback_classes:
        ctx.custom_execution_callback_classes.append(PacedScheduling)
    work = [{"pass_index": index, "shard": path}
            for index in range(passes) for path in shard_paths]
    return ray.data.from_items(work, override_num_blocks=len(work)).map_batches(
        shard_views, batch_size=1, batch_format="pyarrow", num_cpus=task_cpus,
        fn_kwargs=dict(filesystem=filesystem, batch_size=batch_size, split=split,
                       val_fraction=val_fraction, base_size=base_size,
                       image_size=image_size, augment=augment, seed=seed),
        compute=ray.data.TaskPoolStrategy(size=max_tasks))


def shard_views(work: pa.Table, *, filesystem, batch_size: int, **settings):
    """``map_batches`` task for one (pass, shard) row: read the shard's columns
    once, then yield one :class:`ViewBatch` result per ``batch_size`` rows.
    Tasks run in Ray's pooled worker processes, which stay alive between
    tasks and trials (see ``runner.cluster.keep_idle_workers``), so the
    stream starts without waiting for processes to start and import torch."""
    import pyarrow.parquet as pq

    (index,), (shard,) = work["pass_index"].to_pylist(), work["shard"].to_pylist()
    table = pq.read_table(shard, filesystem=filesystem,
                          columns=["image", "label", "fold", "path"])
    views = ViewBatch(**settings, pass_index=index)
    for start in range(0, table.num_rows, batch_size):
        yield views(table.slice(start, batch_size))


class PacedScheduling(ExecutionCallback):
    """Keep Ray Data's scheduling loop from spinning while it waits on us.

    The streaming executor blocks in ``ray.wait`` only while it has tasks in
    flight. Once the trainers are the bottleneck its output queue is full, no
    task runs, and the loop turns without pause: measured on 2 CPUs, Ray Train's
    split coordinator then burned over half a core, a quarter of the machine,
    taken from the trainer it feeds. Each loop step is stretched to at least
    ``MIN_STEP_S``; a step that waited on a task is already longer, so a busy
    stream loses nothing and a backpressured one idles.
    """

    MIN_STEP_S = 0.05

    def __init__(self):
        self._last = time.perf_counter()

    def on_execution_step(self, executor) -> None:
        spare = self.MIN_STEP_S - (time.perf_counter() - self._last)
        if spare > 0:
            time.sleep(spare)
        self._last = time.perf_counter()
