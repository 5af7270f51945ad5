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

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F

from runner.config import AugmentConfig

READ_CPUS = 0.1  # per Parquet read task: they only copy column chunks


def split_mask(fold: pa.Array, split: str, val_fraction: float) -> pa.Array:
    """Rows of training_set that belong to ``split`` ("train" or "val").

    The fold column is a stable hash of the path, so the validation split is
    the same in every run and never overlaps the training rows.
    """
    cut = round(100 * val_fraction)
    if split == "val":
        return pc.less(fold, cut)
    return pc.greater_equal(fold, cut)


def decode_pixels(column: pa.Array, base_size: int) -> np.ndarray:
    """Binary column of HWC uint8 images -> (N, base, base, 3) uint8 array."""
    flat = b"".join(column.to_pylist())
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
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float()
    grid = F.affine_grid(theta, [x.shape[0], 3, size, size], align_corners=False)
    # Reflection keeps rotated corners filled with image content, as Keras'
    # "nearest"/"reflect" fill modes do, instead of black wedges.
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection",
                        align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8).numpy()


def identity_affines(n: int) -> torch.Tensor:
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    return theta


class ViewBatch:
    """``map_batches`` function: filter a split, then make one view per image.

    A class, so each augmentation worker seeds its generator once from OS
    entropy; a fresh draw per batch keeps views independent across epochs.
    """

    def __init__(self, split: str, val_fraction: float, base_size: int,
                 image_size: int, augment: AugmentConfig | None):
        self.split, self.val_fraction = split, val_fraction
        self.base_size, self.image_size = base_size, image_size
        self.augment = augment
        self.rng = np.random.default_rng()
        torch.set_num_threads(1)  # one core per augmentation worker

    def __call__(self, table: pa.Table) -> dict:
        if self.split in ("train", "val"):
            table = table.filter(split_mask(table["fold"], self.split,
                                            self.val_fraction))
        pixels = decode_pixels(table["image"].combine_chunks(), self.base_size)
        n = len(pixels)
        theta = (random_affines(n, self.augment, self.rng) if self.augment
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
                  actor_cpus: float = 0.5, max_actors: int = 1,
                  read_cpus: float = READ_CPUS):
    """A lazy Ray Dataset of {"image": uint8 (3,S,S), "label": float} rows.

    ``split`` is "train" or "val" (both read training_set shards) or "test".
    ``augment`` None gives the deterministic eval view.
    """
    import ray.data

    # The file-listing step of Ray Data's newer Parquet reader always asks for
    # a whole CPU, which a small cluster whose CPUs the trainers hold can never
    # grant (the stream would wait forever); the classic reader lets us size
    # the read tasks, which only copy column chunks.
    ctx = ray.data.DataContext.get_current()
    ctx.use_datasource_v2 = False
    ds = ray.data.read_parquet(shard_paths, filesystem=filesystem,
                               columns=["image", "label", "fold"], num_cpus=read_cpus)
    return ds.map_batches(
        view_batch, batch_format="pyarrow", batch_size=batch_size,
        num_cpus=actor_cpus,
        fn_kwargs=dict(split=split, val_fraction=val_fraction, base_size=base_size,
                       image_size=image_size, augment=augment),
        compute=ray.data.TaskPoolStrategy(size=max_actors))


def view_batch(table: pa.Table, **settings) -> dict:
    """``map_batches`` task: one :class:`ViewBatch` call. Tasks run in Ray's
    pooled worker processes, which stay alive between tasks and epochs (see
    ``runner.cluster.keep_idle_workers``), so an epoch's stream starts without
    waiting for an actor pool to come up and import torch again."""
    return ViewBatch(**settings)(table)
