"""The per-worker training loop that Ray Train runs in every worker.

Each worker builds the child network from its spec, loads its starting
weights (the transfer the trial prepared, or the worker group's own last
checkpoint after a restart), wraps it in DDP (gloo on CPU) and trains on its
shard of the augmented training stream. After every epoch all workers agree
on one flat metrics dict (summed with all-reduce), rank 0 attaches a
checkpoint, and every worker reports, so Ray Train (and Tune above it) sees
one result per epoch.

Compute is counted where it is spent: training FLOPs are the analytic cost of
one image (forward + backward) times the images seen by all workers;
CPU-seconds are the training processes' own CPU time (augmentation workers are
not included: see ``runner.resources`` for how their share is sized).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import ray.train
import ray.train.torch

from runner import storage
from runner.errors import RunnerError
from runner.data.pipeline import eval_view
from runner.evaluate import load_split
from runner.model import ModelSpec, build_model, train_flops_per_image
from runner.model.checkpoint import (load_checkpoint, load_newest_intact,
                                     save_checkpoint)
from runner.train import precision

log = logging.getLogger(__name__)

# Batches the shard iterator fetches ahead of the step, so the short stall
# while the stream (re)starts at each epoch is absorbed rather than felt.
PREFETCH_BATCHES = 4

# Counters summed over workers after each epoch.
_SUMS = ("loss_sum", "correct", "seen", "val_loss_sum", "val_correct",
         "val_seen", "cpu_s", "wait_s", "step_s")


def train_loop(config: dict) -> None:
    """Ray Train entry point; ``config`` is built by ``runner.growth.stage``."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(config["threads"])
    spec = ModelSpec.from_dict(config["spec"])
    model, start_epoch, totals = _initial_state(spec, config)
    model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"],
                                 weight_decay=config.get("weight_decay", 0.0))
    flops_per_image = train_flops_per_image(spec)
    setting = config.get("precision", "fp32")
    arithmetic = precision.resolve(setting)
    if ray.train.get_context().get_world_rank() == 0:
        log.info("%s: training in %s", config.get("trial", "trial"),
                 precision.describe(setting))

    stream = _batches(config)
    per_epoch = config["train_images"] * config["views_per_epoch"] / _world_size()
    for epoch in range(start_epoch, config["epochs"]):
        t0 = time.perf_counter()
        frozen = (_params(model, config.get("frozen", []))
                  if epoch < config.get("freeze_epochs", 0) else [])
        torch.manual_seed(config.get("seed", 0) + epoch)  # dropout masks
        for group in optimizer.param_groups:
            group["lr"] = lr_at(epoch, config["epochs"], config["lr"],
                                config.get("lr_schedule", "constant"))
        # Epochs are counted off one stream that holds the whole trial: the
        # k-th (after a restart, counted from the restart) ends once this
        # worker has seen k epochs' worth of images, the last one with the
        # stream.
        until = (epoch + 1 - start_epoch) * per_epoch
        counts = _train_epoch(model, optimizer, stream, until, frozen, arithmetic)
        counts.update(_evaluate(model, config))
        counts = _all_reduce(counts)
        wall = time.perf_counter() - t0
        totals = _accumulate(totals, counts, wall, flops_per_image)
        metrics = _metrics(epoch + 1, counts, totals, wall, _world_size())
        _report(metrics, spec, model, epoch + 1, totals, config, arithmetic)
        if over_budget(metrics, config.get("budget") or {}):
            break


LR_FLOOR = 0.05  # of the base rate, at a cosine schedule's last epoch


def lr_at(epoch: int, epochs: int, lr: float, schedule: str) -> float:
    """The learning rate for ``epoch`` (0-based) of ``epochs``. A function of
    the epoch alone, so a restarted trial goes on at the right rate."""
    if schedule == "constant" or epochs <= 1:
        return lr
    done = epoch / (epochs - 1)
    return lr * (LR_FLOOR + (1 - LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * done)))


def over_budget(metrics: dict, budget: dict) -> bool:
    """True once any budgeted counter (flops, cpu_s, wall_s) reached its cap;
    checked at epoch ends, so a trial overshoots by at most one epoch."""
    return any(metrics[unit] >= cap for unit, cap in budget.items())


def _initial_state(spec: ModelSpec, config: dict):
    """Weights to start from, the epoch to go on after and the running totals:
    our own newest intact checkpoint after a restart (a worker or node died,
    or the driver was restarted), else the transfer the trial prepared, else a
    fresh network."""
    restored = ray.train.get_checkpoint()
    if restored is None:
        return _first_weights(spec, config), 0, _zero_totals()
    newest = storage.Location(restored.filesystem, restored.path, restored.path)
    try:
        _, state, meta, used = load_newest_intact(newest)
    except RunnerError as err:
        log.warning("%s; starting the trial over from its first weights", err)
        return _first_weights(spec, config), 0, dict(_zero_totals(), restarts=1)
    model = build_model(spec)
    model.load_state_dict(state)
    totals = dict(meta["totals"], restarts=meta["totals"].get("restarts", 0) + 1)
    log.info("%s: restart %d, resuming after epoch %d from %s",
             config.get("trial", "trial"), totals["restarts"], meta["epoch"], used.uri)
    return model, meta["epoch"], totals


def _zero_totals() -> dict:
    return {"flops": 0.0, "cpu_s": 0.0, "wall_s": 0.0, "images": 0, "restarts": 0}


def _first_weights(spec: ModelSpec, config: dict):
    """The child as the trial prepared it (or fresh if it prepared none)."""
    model = build_model(spec)
    if config.get("init_checkpoint"):
        with tempfile.TemporaryDirectory() as tmp:
            init = storage.resolve(config["init_checkpoint"])
            _, state, _ = load_checkpoint(storage.download_dir(init, tmp))
        model.load_state_dict(state)
    return model


def _params(model, names: list[str]) -> list:
    """The parameters called ``names`` (DDP's ``module.`` prefix ignored)."""
    wanted = set(names)
    return [p for n, p in model.named_parameters()
            if n.removeprefix("module.") in wanted]


def _to_input(images: torch.Tensor) -> torch.Tensor:
    x = images.float().div_(255)
    return x.contiguous(memory_format=torch.channels_last)


class _Stream:
    """This worker's batches of the trial's stream, and how many images it has
    handed out so far."""

    def __init__(self, batches):
        self.batches, self.images = batches, 0

    def next(self):
        batch = next(self.batches, None)
        if batch is not None:
            self.images += len(batch["label"])
        return batch


def _batches(config: dict) -> _Stream:
    shard = ray.train.get_dataset_shard("train")
    return _Stream(iter(shard.iter_torch_batches(
        batch_size=config["batch_size"], device="cpu",
        prefetch_batches=PREFETCH_BATCHES)))


def _world_size() -> int:
    return ray.train.get_context().get_world_size()


def _train_epoch(model, optimizer, stream: _Stream, until: float,
                 frozen: list, arithmetic: str = "fp32") -> dict:
    """Train on ``stream`` until it has handed out ``until`` images (or ends).

    Every worker's share of the stream is the same size and comes in full
    batches but for the very last, so all workers take the same number of
    steps and DDP's all-reduces pair up. ``frozen`` tensors keep their
    transferred values: their gradients are dropped before the step, so Adam
    skips them. (Turning off requires_grad instead would break DDP, which
    expects a gradient for every parameter.) ``arithmetic`` is the resolved
    ``train.precision``; the loss is taken in float32 either way.
    """
    model.train()
    c = dict.fromkeys(_SUMS, 0.0)
    cpu0 = time.process_time()
    while stream.images < until:
        t_wait = time.perf_counter()
        batch = stream.next()
        t_step = time.perf_counter()
        c["wait_s"] += t_step - t_wait
        if batch is None:
            break
        x, y = _to_input(batch["image"]), batch["label"].float()
        with precision.autocast(arithmetic):
            logits = model(x).squeeze(1)
        logits = logits.float()
        loss = F.binary_cross_entropy_with_logits(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for p in frozen:
            p.grad = None
        optimizer.step()
        c["step_s"] += time.perf_counter() - t_step
        c["loss_sum"] += loss.item() * len(y)
        c["correct"] += ((logits > 0).float() == y).sum().item()
        c["seen"] += len(y)
    c["cpu_s"] = time.process_time() - cpu0
    return c


_VAL_CACHE: dict = {}


def _val_slice(config: dict):
    """This worker's share of the validation images (every world_size-th),
    read once straight from the shards: the split is small, fixed and needs
    no augmentation, so it does not need a pipeline of its own."""
    ctx = ray.train.get_context()
    key = (ctx.get_world_rank(), ctx.get_world_size())
    if key not in _VAL_CACHE:
        v = config["val"]
        pixels, labels = load_split(v["manifest"], "val", v["val_fraction"])
        rank, world = key
        _VAL_CACHE.clear()
        _VAL_CACHE[key] = (eval_view(pixels[rank::world], v["image_size"]),
                           torch.from_numpy(labels[rank::world]).float())
    return _VAL_CACHE[key]


@torch.no_grad()
def _evaluate(model, config: dict) -> dict:
    model.eval()
    images, labels = _val_slice(config)
    c = {"val_loss_sum": 0.0, "val_correct": 0.0, "val_seen": 0.0}
    for i in range(0, len(labels), 256):
        x = images[i:i + 256].contiguous(memory_format=torch.channels_last)
        y = labels[i:i + 256]
        # The DDP wrapper would sync buffers on forward; evaluate the inner model.
        logits = getattr(model, "module", model)(x).squeeze(1)
        c["val_loss_sum"] += F.binary_cross_entropy_with_logits(
            logits, y, reduction="sum").item()
        c["val_correct"] += ((logits > 0).float() == y).sum().item()
        c["val_seen"] += len(y)
    return c


def _all_reduce(counts: dict) -> dict:
    if not (dist.is_available() and dist.is_initialized()):
        return counts
    t = torch.tensor([counts[k] for k in _SUMS], dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(_SUMS, t.tolist()))


def _accumulate(totals: dict, c: dict, wall: float, flops_per_image: float) -> dict:
    return {"flops": totals["flops"] + c["seen"] * flops_per_image,
            "cpu_s": totals["cpu_s"] + c["cpu_s"],
            "wall_s": totals["wall_s"] + wall,
            "images": totals["images"] + int(c["seen"]),
            "restarts": totals.get("restarts", 0)}


def _metrics(epoch: int, c: dict, totals: dict, wall: float, world: int) -> dict:
    """The flat dict that goes to the log, Tune's CSV/TensorBoard and lineage.
    ``c`` holds the epoch's counters summed over the ``world`` workers."""
    seen, val_seen = max(c["seen"], 1), max(c["val_seen"], 1)
    busy = c["wait_s"] + c["step_s"]
    return {
        "epoch": epoch,
        "train_loss": c["loss_sum"] / seen,
        "train_acc": c["correct"] / seen,
        "val_loss": c["val_loss_sum"] / val_seen,
        "val_acc": c["val_correct"] / val_seen,
        "images_per_s": c["seen"] / max(wall, 1e-9),
        "data_wait_frac": c["wait_s"] / max(busy, 1e-9),
        # the epoch's training part, per worker: waiting for data plus steps
        # (the wall time adds validation and the checkpoint)
        "train_s": busy / world,
        "epoch_wall_s": wall,
        "flops": totals["flops"],
        "cpu_s": totals["cpu_s"],
        "wall_s": totals["wall_s"],
        "images_seen": totals["images"],
        # Times this trial's training went on from a checkpoint (a worker or
        # node lost, or the driver restarted).
        "restarts": totals.get("restarts", 0),
    }


def _report(metrics: dict, spec, model, epoch: int, totals: dict, config: dict,
            arithmetic: str):
    ctx = ray.train.get_context()
    if ctx.get_world_rank() != 0:
        ray.train.report(metrics)
        return
    log.info("%s epoch %d: val_acc %.4f train_loss %.4f %.0f img/s wait %.1f%%",
             config.get("trial", "trial"), epoch, metrics["val_acc"],
             metrics["train_loss"], metrics["images_per_s"],
             100 * metrics["data_wait_frac"])
    state = getattr(model, "module", model).state_dict()
    with tempfile.TemporaryDirectory() as tmp:
        manifest = config["val"]["manifest"]
        # Classes and pixel size make the checkpoint usable on its own
        # (runner predict / evaluate) without the run that wrote it.
        save_checkpoint(tmp, spec, state, {
            "epoch": epoch, "totals": totals, "metrics": metrics,
            "classes": manifest["classes"], "base_size": manifest["base_size"],
            "precision": arithmetic})
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"epoch-{epoch:03d}")


def worker_env(threads: int) -> dict:
    """Environment for training workers: as many BLAS/OpenMP threads as the
    CPUs they reserved (Ray would otherwise pin them to 1), and a fixed glibc
    mmap threshold so large activation buffers are reused instead of being
    mapped and unmapped on every step."""
    return {"OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "GLIBC_TUNABLES": os.environ.get(
                "RUNNER_GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=268435456")}
