"""Where the images/s go: ingest, augmentation, the bare training step, a plain
PyTorch loop and the whole Ray job, side by side on the real data, plus peak
memory and a projection of data-parallel scaling over slow networks.

    .venv/bin/python bench/throughput.py                      # everything
    .venv/bin/python bench/throughput.py --images 256 --epochs 1 \\
        --only ingest,augment,step,plain --steps 3 --warmup 1   # seconds

Parts (``--only``, comma separated; all by default):

  ingest   ``runner.data.ingest.ingest`` into a temp folder, force=True
  augment  random_affines + resample on pre-decoded pixels, one torch thread
  step     one training step on synthetic data, all cores, two ways: one
           process with a torch thread per core, and one single-threaded
           data-parallel process per core (gloo on loopback, the job's
           default); the faster is the machine's limit
  plain    a single-process loop: pixels decoded once, inline augmentation,
           the same step, one pass over the train split (val excluded)
  ray      ``runner.growth.loop.grow`` on a private local Ray (loopback, all
           CPUs) at the job's settings, one stage of --epochs per model;
           images/s and data wait as the trainers report them; Ray workers'
           RSS and the object store sampled. Skipped if a Ray cluster already
           runs on this machine.
  scale    gloo all-reduce between two processes on loopback, then a ring
           all-reduce projection for 1..64 nodes at 1 and 10 Gbit/s

Nothing here asserts on timings: the figures depend on what else the machine
is doing, so the load average is printed with them.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import resource
import shlex
import shutil
import socket
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

# Heavy imports (torch, ray) stay inside the parts: ingest's forkserver pool
# re-imports this module in its server process, and --help should be instant.

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("classifier_1", "classifier_2")
PARTS = ("ingest", "augment", "step", "plain", "ray", "scale")
NODES = (1, 2, 4, 8, 16, 32, 64)
LINKS_GBIT = (1, 10)
KERAS_IMAGES_PER_S = 500       # the original Keras recipe on this data
TARGET_IMAGES_PER_S = 2 * KERAS_IMAGES_PER_S
TARGET_E2E_FRACTION = 0.80     # of step-alone, classifier_2
TARGET_WAIT = 0.05             # trainers' data-wait fraction
MMAP_THRESHOLD = 256 * 2**20   # bytes, what runner.train.loop.worker_env sets
M_MMAP_THRESHOLD = -3          # glibc mallopt parameter number
SAMPLE_EVERY_S = 1.0
MIB = 2**20


@dataclass
class Row:
    part: str
    model: str
    images: int
    seconds: float
    note: str = ""

    @property
    def rate(self) -> float:
        return self.images / max(self.seconds, 1e-9)


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    step_s: dict = field(default_factory=dict)      # model -> seconds per step
    step_rate: dict = field(default_factory=dict)   # model -> images/s
    e2e: dict = field(default_factory=dict)         # model -> (images/s, wait)
    memory: dict = field(default_factory=dict)      # label -> bytes
    allreduce: dict = field(default_factory=dict)   # name -> seconds
    failed: list = field(default_factory=list)      # "part: error" lines
    skipped: list = field(default_factory=list)     # "part: why" lines

    def add(self, row: Row) -> None:
        self.rows.append(row)
        progress(f"{row.part} {row.model}: {row.rate:,.0f} images/s {row.note}")


def progress(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ data


def subset_root(data: str, images: int, tmp: str) -> str:
    """A copy of about ``images`` files of ``data`` in the same layout, every
    split/class cut by the same fraction (copies, not links: ingest does not
    follow links that leave the data root)."""
    folders = [(s, c) for s in ("training_set", "test_set")
               for c in sorted(os.listdir(os.path.join(data, s)))]
    files = {f: sorted(os.listdir(os.path.join(data, *f))) for f in folders}
    total = sum(map(len, files.values()))
    root = os.path.join(tmp, "subset")
    for folder, names in files.items():
        os.makedirs(os.path.join(root, *folder))
        for name in names[:max(1, math.ceil(len(names) * images / total))]:
            shutil.copy(os.path.join(data, *folder, name),
                        os.path.join(root, *folder, name))
    return root


def bench_ingest(data_root: str, out: str, base_size: int, res: Results) -> dict:
    from runner.data.ingest import ingest

    t0 = time.perf_counter()
    manifest = ingest(data_root, out, base_size=base_size, force=True)
    seconds = time.perf_counter() - t0
    images = sum(sum(c.values()) for c in manifest["counts"].values())
    res.add(Row("ingest", "-", images, seconds,
                f"{os.cpu_count()} procs; {len(manifest['skipped'])} skipped"))
    return manifest


def shards(args, data_root: str, tmp: str, parts: set, res: Results) -> dict | None:
    """The manifest the other parts read (``location`` added), or None.

    Always a fresh folder under ``tmp``: the Ray part hands it to ``grow``,
    whose ingest would rewrite any folder made from other data.
    """
    from runner.data.ingest import ingest

    if not parts & {"ingest", "augment", "plain", "ray"}:
        return None
    out = os.path.join(tmp, "shards")
    if "ingest" in parts:
        manifest = bench_ingest(data_root, out, args.base_size, res)
    else:
        progress(f"ingesting {data_root} (untimed: the ingest part is not selected)")
        manifest = ingest(data_root, out, base_size=args.base_size)
    return dict(manifest, location=out)


def training_set_pixels(manifest: dict):
    """Every training_set image as (N, base, base, 3) uint8, train and val."""
    import numpy as np
    import pyarrow.parquet as pq

    from runner import storage
    from runner.data.ingest import shard_paths
    from runner.data.pipeline import decode_pixels

    loc = storage.resolve(manifest["location"])
    tables = [pq.read_table(path, filesystem=loc.fs, columns=["image"])
              for path in shard_paths(loc, manifest)["train"]]
    return np.concatenate([decode_pixels(t["image"].combine_chunks(),
                                         manifest["base_size"]) for t in tables])


# -------------------------------------------------------- augmentation


def bench_augment(manifest: dict, args, res: Results) -> None:
    import numpy as np
    import torch

    from runner.data.pipeline import random_affines, resample

    pixels = training_set_pixels(manifest)  # the split does not matter here
    n = min(args.aug_images, args.images or args.aug_images, len(pixels))
    torch.set_num_threads(1)  # one core, as each ViewBatch actor has
    rng = np.random.default_rng(0)
    t0, cpu0 = time.perf_counter(), time.process_time()
    for i in range(0, n, args.aug_batch):
        batch = pixels[i:i + args.aug_batch]
        resample(batch, random_affines(len(batch), args.augment, rng), args.image_size)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    res.add(Row("augment", "-", n, seconds,
                f"1 thread, batch {args.aug_batch}; {n / max(cpu, 1e-9):,.0f} "
                "per CPU-s"))


# ------------------------------------------------------------- training


def make_trainer(name: str, threads: int):
    """The model and optimizer exactly as runner.train.loop builds them."""
    import torch

    from runner.model import build_model, get_spec

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(get_spec(name)).to(memory_format=torch.channels_last)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def train_step(model, optimizer, images, labels, arithmetic: str) -> float:
    """runner.train.loop's step: uint8 batch in, one Adam update, the forward
    pass at ``arithmetic`` (resolved train.precision)."""
    import torch
    import torch.nn.functional as F

    from runner.train import precision

    x = images.float().div_(255).contiguous(memory_format=torch.channels_last)
    with precision.autocast(arithmetic):
        logits = model(x).squeeze(1)
    logits = logits.float()
    loss = F.binary_cross_entropy_with_logits(logits, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def step_seconds(name: str, args) -> float:
    """Seconds per training step on one synthetic batch, after warm-up, in
    this process with one torch thread per core."""
    import torch

    model, optimizer = make_trainer(name, os.cpu_count())
    size = args.image_size
    images = torch.randint(0, 256, (args.batch, 3, size, size), dtype=torch.uint8)
    labels = (torch.rand(args.batch) < 0.5).float()
    for _ in range(args.warmup):
        train_step(model, optimizer, images, labels, args.precision)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        train_step(model, optimizer, images, labels, args.precision)
    return (time.perf_counter() - t0) / args.steps


def _ddp_step_worker(rank: int, world: int, port: int, name: str, args,
                     out: str) -> None:
    """One single-threaded data-parallel worker, as the job's default plan
    runs them: its part of the global batch, then the gradient all-reduce."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    set_mmap_threshold()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model, _ = make_trainer(name, 1)
    model = DistributedDataParallel(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch, size = args.batch // world, args.image_size
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    labels = (torch.rand(batch) < 0.5).float()
    for _ in range(args.warmup):
        train_step(model, optimizer, images, labels, args.precision)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        train_step(model, optimizer, images, labels, args.precision)
    seconds = (time.perf_counter() - t0) / args.steps
    if rank == 0:
        with open(out, "w") as f:
            json.dump(seconds, f)
    dist.destroy_process_group()


def ddp_step_seconds(name: str, args, tmp: str) -> float:
    """Seconds per global-batch step of one single-threaded worker per core."""
    import torch.multiprocessing as mp

    world = os.cpu_count() or 1
    out = os.path.join(tmp, f"ddp-step-{name}.json")
    mp.spawn(_ddp_step_worker, args=(world, free_port(), name, args, out),
             nprocs=world)
    with open(out) as f:
        return json.load(f)


def bench_step(args, tmp: str, res: Results) -> None:
    """The step alone two ways: one process with a torch thread per core, and
    one single-threaded data-parallel process per core (the job's default).
    The faster is the machine's limit for the model."""
    cores = os.cpu_count() or 1
    for name in args.models:
        layouts = {f"1 process x {cores} threads": step_seconds(name, args)}
        if cores > 1:
            layouts[f"{cores} processes x 1 thread"] = ddp_step_seconds(name, args, tmp)
        for layout, seconds in layouts.items():
            res.add(Row("step", name, args.batch * args.steps, seconds * args.steps,
                        f"synthetic, batch {args.batch}, {layout}, "
                        f"{seconds * 1e3:.0f} ms/step"))
        res.step_s[name] = min(layouts.values())
        res.step_rate[name] = args.batch / res.step_s[name]


def bench_plain(manifest: dict, args, res: Results) -> None:
    import numpy as np
    import torch

    from runner.data.pipeline import random_affines, resample
    from runner.evaluate import load_split

    t0 = time.perf_counter()
    # load_split drops the val rows with runner.data.pipeline.split_mask.
    pixels, labels = load_split(manifest, "train", args.val_fraction)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    for name in args.models:
        model, optimizer = make_trainer(name, os.cpu_count())
        t0, seen = time.perf_counter(), 0
        for _ in range(args.epochs):
            order = rng.permutation(len(pixels))
            for i in range(0, len(order), args.batch):
                idx = order[i:i + args.batch]
                views = resample(pixels[idx], random_affines(len(idx), args.augment,
                                                             rng), args.image_size)
                train_step(model, optimizer, torch.from_numpy(views),
                           torch.from_numpy(labels[idx]).float(), args.precision)
                seen += len(idx)
        res.add(Row("plain", name, seen, time.perf_counter() - t0,
                    f"{args.epochs} epoch(s) of {len(pixels)}; shards read "
                    f"once in {load_s:.1f} s"))


# ------------------------------------------------------------------ Ray


def gcs_servers() -> list[int]:
    """Pids of running Ray GCS servers: one per Ray cluster on this machine."""
    return [pid for pid, cmd in proc_cmdlines()
            if os.path.basename(cmd[0]) == b"gcs_server"]


def proc_cmdlines():
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    yield int(entry), f.read().split(b"\0")
            except OSError:
                continue  # gone, or not ours to read


def ray_pids() -> set[int]:
    # Ray workers retitle themselves "ray::<actor or task>".
    return {pid for pid, cmd in proc_cmdlines() if cmd[0].startswith(b"ray::")}


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakSampler(threading.Thread):
    """Every second: the RSS sum of this cluster's ``ray::`` processes and the
    object store in use, keeping the peaks. Shared pages (the object store,
    torch's libraries) count once per process, so the RSS sum is an upper
    bound on the memory the workers need."""

    def __init__(self, exclude: set[int]):
        super().__init__(daemon=True)
        self.exclude, self.stop = exclude, threading.Event()
        self.peak = {"ray workers RSS (sum)": 0, "object store (resources)": 0,
                     "object store (plasma used)": 0}

    def run(self) -> None:
        while not self.stop.wait(SAMPLE_EVERY_S):
            self.sample()

    def sample(self) -> None:
        rss = sum(rss_bytes(p) for p in ray_pids() - self.exclude)
        now = {"ray workers RSS (sum)": rss,
               "object store (resources)": store_reserved(),
               "object store (plasma used)": plasma_used()}
        for key, value in now.items():
            self.peak[key] = max(self.peak[key], value or 0)


def store_reserved() -> int | None:
    import ray

    try:
        total = ray.cluster_resources().get("object_store_memory", 0)
        free = ray.available_resources().get("object_store_memory", total)
    except Exception:  # noqa: BLE001  (a missed sample is not worth a crash)
        return None
    return int(total - free)


def plasma_used() -> int | None:
    # The resource difference above counts reservations only; the raylet's
    # store stats say what objects actually occupy. A private Ray API: a
    # failure only costs this figure.
    try:
        from ray._private.internal_api import (
            get_memory_info_reply,
            get_state_from_address,
        )
        reply = get_memory_info_reply(get_state_from_address(), timeout_seconds=5)
        return int(reply.store_stats.object_store_bytes_used)
    except Exception:  # noqa: BLE001
        return None


def ray_job(args, model: str, data_root: str, manifest: dict, tmp: str):
    from runner.config import load_job

    stage = f"[{{name: bench, model: {model}, epochs: {args.epochs}}}]"
    return load_job(args.job, [
        f"storage={os.path.join(tmp, 'ray-' + model)}", f"data.root={data_root}",
        f"data.shards={manifest['location']}", "baseline=false",
        f"train.precision={args.precision}",
        f"ray.num_cpus={os.cpu_count()}", f"stages={stage}"])


def bench_ray(args, data_root: str, manifest: dict, tmp: str, res: Results) -> None:
    running = gcs_servers()
    if running:
        # A second cluster beside it would confuse Ray Train's CPU accounting
        # (see runner/cluster.py), and both would share the same cores.
        res.skipped.append(f"ray: a Ray cluster already runs here (gcs_server "
                           f"pid {running[0]}); stop it first")
        progress(f"skipped {res.skipped[-1]}")
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback
    import ray

    from runner.cluster import keep_idle_workers
    from runner.growth.loop import grow

    sampler = PeakSampler(exclude=ray_pids())
    keep_idle_workers(os.cpu_count() or 1)  # as `runner grow` does
    # The dashboard stays on: Ray Train frees a stopped trial's CPUs through it.
    ray.init(num_cpus=os.cpu_count(), logging_level="WARNING")
    sampler.start()
    try:
        for model in args.models:
            t0 = time.perf_counter()
            lineage = grow(ray_job(args, model, data_root, manifest, tmp))
            e2e_row(model, lineage, time.perf_counter() - t0, res)
    finally:
        sampler.stop.set()
        sampler.join()
        ray.shutdown()
    res.memory.update(sampler.peak)


def e2e_row(model: str, lineage: dict, grow_s: float, res: Results) -> None:
    """The trainers' own figures, from the lineage, over every epoch after the
    first (the first pays for starting the workers and the stream, and is
    shown apart). Two rows: the training part of each epoch (augmentation
    and steps, as the trainers wait for and take batches: what the targets
    are about) and the whole epoch, which adds the validation pass over the
    held-out images and the checkpoint."""
    epochs = lineage["stages"][0]["trials"][0]["epochs"]
    per_epoch = epochs[-1]["images_seen"] / epochs[-1]["epoch"]
    walls = [per_epoch / max(e["images_per_s"], 1e-9) for e in epochs]
    steady = slice(1, None) if len(epochs) > 1 else slice(0, None)
    images = per_epoch * len(walls[steady])
    wall = sum(walls[steady])
    train = sum(e["train_s"] for e in epochs[steady])
    wait = sum(e["data_wait_frac"] * e["train_s"] for e in epochs[steady]) / max(train, 1e-9)
    res.e2e[model] = (images / max(train, 1e-9), wait)
    span = f"epochs {epochs[steady][0]['epoch']}-{epochs[-1]['epoch']}"
    res.add(Row("ray", model, int(images), train,
                f"{span}, training part; wait {100 * wait:.1f}%; epoch 1 "
                f"{epochs[0]['images_per_s']:,.0f} images/s (whole epoch), wait "
                f"{100 * epochs[0]['data_wait_frac']:.0f}%"))
    res.add(Row("ray+val", model, int(images), wall,
                f"{span}, whole epochs: + validation and checkpoint; grow() "
                f"{grow_s:.0f} s incl. start-up"))


# ----------------------------------------------------------- scaling


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _allreduce_worker(rank: int, port: int, sizes: dict, repeats: int,
                      out: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    seconds = {}
    for name, numel in sizes.items():
        t = torch.ones(numel, dtype=torch.float32)
        for _ in range(2):  # warm-up: connections, buffers
            dist.all_reduce(t)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(repeats):
            dist.all_reduce(t)
        seconds[name] = (time.perf_counter() - t0) / repeats
    if rank == 0:
        with open(out, "w") as f:
            json.dump(seconds, f)
    dist.destroy_process_group()


def measure_allreduce(args, tmp: str) -> dict:
    """Seconds per all-reduce between two loopback processes: one float (the
    latency) and a flat fp32 tensor the size of each model's parameters."""
    import torch.multiprocessing as mp

    from runner.model import get_spec
    from runner.model.spec import num_params

    sizes = {"latency": 1, **{m: num_params(get_spec(m)) for m in MODELS}}
    out = os.path.join(tmp, "allreduce.json")
    mp.spawn(_allreduce_worker, args=(free_port(), sizes, args.repeats, out),
             nprocs=2)
    with open(out) as f:
        return json.load(f)


def projected_rate(step_s: float, numel: int, nodes: int, gbit: float,
                   latency_s: float, batch: int) -> float:
    """images/s of ``nodes`` data-parallel nodes under a ring all-reduce with
    no overlap: 2(N-1)/N of the gradient bytes cross each link, and each of
    the 2(N-1) ring steps pays half the measured 2-process latency."""
    wire = 2 * (nodes - 1) / nodes * 4 * numel / (gbit * 1e9 / 8)
    return nodes * batch / (step_s + wire + (nodes - 1) * latency_s)


def bench_scale(args, tmp: str, res: Results) -> None:
    res.allreduce = measure_allreduce(args, tmp)
    for name in MODELS:  # the projection always covers both
        if name not in res.step_s:
            progress(f"scale: timing the {name} step (the step part was not run)")
            res.step_s[name] = step_seconds(name, args)


# ------------------------------------------------------------- report


def header(args) -> None:
    from runner.train import precision

    load = os.getloadavg()
    print(f"command: {shlex.join(sys.orig_argv)}")
    print(f"cpus: os.cpu_count()={os.cpu_count()}, usable "
          f"{len(os.sched_getaffinity(0))}; load average {load[0]:.2f} "
          f"{load[1]:.2f} {load[2]:.2f} (other work skews every figure)")
    subset = f", a copy of about {args.images} images" if args.images else ""
    print(f"data: {args.data}{subset}; job {args.job}; batch {args.batch}; "
          f"{args.image_size}px views of {args.base_size}px pixels; training in "
          f"{precision.describe(args.precision_setting)}; glibc mmap "
          f"threshold {'fixed as in worker_env' if args.mmap_fixed else 'default'}")


def print_table(res: Results) -> None:
    print(f"\n{'part':<8} {'model':<13} {'images':>7} {'seconds':>8} "
          f"{'images/s':>9}  notes")
    for r in res.rows:
        print(f"{r.part:<8} {r.model:<13} {r.images:>7,} {r.seconds:>8.2f} "
              f"{r.rate:>9,.0f}  {r.note}")
    for line in res.failed:
        print(f"failed   {line}")
    for line in res.skipped:
        print(f"skipped  {line}")


def print_memory(res: Results) -> None:
    res.memory["driver ru_maxrss"] = resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss * 1024
    print("\npeak memory")
    for label, value in res.memory.items():
        print(f"  {label:<28} {value / MIB:>8,.0f} MiB")


def print_scaling(res: Results, batch: int) -> None:
    from runner.model import get_spec
    from runner.model.spec import num_params

    ar, latency = res.allreduce, res.allreduce["latency"] / 2
    print(f"\nall-reduce, 2 processes on loopback (gloo): 1 float "
          f"{ar['latency'] * 1e6:.0f} us" + "".join(
              f"; {m} {4 * num_params(get_spec(m)) / 1e6:.1f} MB "
              f"{ar[m] * 1e3:.1f} ms" for m in MODELS))
    cols = [(m, g) for m in MODELS for g in LINKS_GBIT]
    print("projected images/s, ring all-reduce, no overlap, "
          f"{os.cpu_count()} cores and batch {batch} per node")
    labels = [f"{m.replace('classifier', 'clf')} {g}Gbit/s" for m, g in cols]
    print(f"{'nodes':>5}" + "".join(f" {label:>16}" for label in labels))
    for n in NODES:
        rates = [projected_rate(res.step_s[m], num_params(get_spec(m)), n, g,
                                latency, batch) for m, g in cols]
        print(f"{n:>5}" + "".join(f" {r:>16,.0f}" for r in rates))


def print_targets(res: Results) -> None:
    c2 = "classifier_2"
    e2e = res.e2e.get(c2, (None, None))[0]
    step = res.step_rate.get(c2)
    frac = e2e / step if e2e and step else None
    waits = [w for _, w in res.e2e.values()]
    print("\ntargets")
    target_line(f"end-to-end / step-alone, {c2}", f">= {TARGET_E2E_FRACTION:.0%}",
                frac, frac is not None and frac >= TARGET_E2E_FRACTION, "{:.0%}")
    target_line(f"end-to-end images/s, {c2}", f">= {TARGET_IMAGES_PER_S}",
                e2e, e2e is not None and e2e >= TARGET_IMAGES_PER_S, "{:,.0f}")
    worst = max(waits) if waits else None
    target_line("trainer data wait (worst model)", f"< {TARGET_WAIT:.0%}",
                worst, worst is not None and worst < TARGET_WAIT, "{:.1%}")


def target_line(label: str, goal: str, value, met: bool, fmt: str) -> None:
    shown = fmt.format(value) if value is not None else "n/a"
    verdict = "n/a (part not run)" if value is None else \
        "met" if met else "not met"
    print(f"  {label:<40} {goal:>8} {shown:>8}  {verdict}")


# --------------------------------------------------------------- main


def run_part(name: str, run, res: Results) -> None:
    """A part that fails is reported under the table; the others still run."""
    try:
        run()
    except Exception as err:  # noqa: BLE001
        traceback.print_exc()
        res.failed.append(f"{name}: {type(err).__name__}: {err}".splitlines()[0])


def set_mmap_threshold() -> bool:
    """The Ray workers run with a fixed glibc mmap threshold (worker_env);
    give the in-process loops the same, or they pay for mapping and unmapping
    big activation buffers that the workers do not."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD,
                                                     MMAP_THRESHOLD))
    except OSError:
        return False


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.path.relpath(
        ROOT.parent / "shared" / "datasets" / "cats_dogs"),
        help="image folder (training_set/, test_set/)")
    p.add_argument("--only", default=",".join(PARTS),
                   help=f"comma list of parts: {', '.join(PARTS)}")
    p.add_argument("--images", type=int, default=None,
                   help="use about this many images (a copied subset): quick runs")
    p.add_argument("--epochs", type=int, default=4,
                   help="plain and ray parts; the ray row covers every epoch after "
                        "the first (which also pays for starting the workers and "
                        "the stream, and is noted apart)")
    p.add_argument("--models", default=",".join(MODELS),
                   help="comma list of the models to time (default: both)")
    p.add_argument("--job", default=str(ROOT / "jobs" / "cats_dogs.yaml"))
    p.add_argument("--batch", type=int, default=128, help="step, plain, scale")
    p.add_argument("--steps", type=int, default=100, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--aug-images", type=int, default=8000)
    p.add_argument("--aug-batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=10, help="timed all-reduces")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default=None,
                   help="every training part (default: the job's train.precision)")
    p.add_argument("--keep", action="store_true", help="keep the temp folder")
    args = p.parse_args(argv)
    parts = {s.strip() for s in args.only.split(",") if s.strip()}
    args.models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    if set(args.models) - set(MODELS):
        p.error(f"unknown model(s) {', '.join(sorted(set(args.models) - set(MODELS)))}; "
                f"choose from {', '.join(MODELS)}")
    if parts - set(PARTS):
        p.error(f"unknown part(s) {', '.join(sorted(parts - set(PARTS)))}; "
                f"choose from {', '.join(PARTS)}")
    return args, parts


def job_settings(args) -> None:
    """Image sizes, split and augmentation come from the job file."""
    from runner.config import load_job

    from runner.train import precision

    job = load_job(args.job)
    args.precision_setting = args.precision or job.train.precision
    args.precision = precision.resolve(args.precision_setting)
    args.base_size, args.image_size = job.data.base_size, job.data.image_size
    args.val_fraction, args.augment = job.data.val_fraction, job.augment


def main(argv=None) -> None:
    args, parts = parse_args(argv)
    job_settings(args)
    args.mmap_fixed = set_mmap_threshold()
    header(args)
    res = Results()
    tmp = tempfile.mkdtemp(prefix="runner-bench-")
    try:
        data_root = (subset_root(args.data, args.images, tmp) if args.images
                     else os.path.abspath(args.data))
        manifest = shards(args, data_root, tmp, parts, res)
        steps = {"augment": lambda: bench_augment(manifest, args, res),
                 "step": lambda: bench_step(args, tmp, res),
                 "plain": lambda: bench_plain(manifest, args, res),
                 "ray": lambda: bench_ray(args, data_root, manifest, tmp, res),
                 "scale": lambda: bench_scale(args, tmp, res)}
        for name, run in steps.items():
            if name in parts:
                run_part(name, run, res)
    finally:
        if args.keep:
            progress(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    print_table(res)
    print_memory(res)
    if res.allreduce:
        print_scaling(res, args.batch)
    print_targets(res)


if __name__ == "__main__":
    main()
