"""Growth ops: pure functions from a parent (spec, weights) to a child.

Every op has the shape ``op(spec, state_dict, **params, rng=None) -> (child_spec,
child_state_dict, TransferReport)`` and never touches its inputs. The
function-preserving ops follow Net2Net (Chen, Goodfellow, Shlens, 2016,
https://arxiv.org/abs/1511.05641):

- ``widen_conv`` / ``widen_dense`` (Net2WiderNet): new units replicate random
  existing ones and the next layer divides the replicated inputs by their
  replication count, so the child computes the same function.
- ``deepen_conv`` (Net2DeeperNet): a new conv initialised as identity; exact
  because its input is post-ReLU, hence non-negative. In a BatchNorm block the
  new BN is set to identity *in eval mode* (running mean 0, var 1, weight
  sqrt(1 + eps)); in training mode it normalises by batch statistics, so the
  function changes once training starts, as any BN layer would.
- ``deepen_block``: a new identity conv + pool block; the pool shrinks the
  flatten, so the first dense layer is folded onto the pooled layout
  (approximate: exact only where features are constant in each pool window).

``plain_copy`` reproduces the original Keras experiment (copy layers by
position where shapes match), ``fresh`` starts over. :func:`transfer_to`
finds a sequence of ops for a target spec; :func:`apply_op` dispatches by name.
Dropout has no weights and is identity in eval, so ops ignore it.
"""

from __future__ import annotations

import inspect
import itertools
import math
from dataclasses import asdict, dataclass, field, replace

import torch

from runner.errors import RunnerError
from runner.model.spec import (
    ConvBlock,
    ConvLayer,
    ModelSpec,
    build_model,
    feature_shape,
    get_spec,
    state_shapes,
)

BN_EPS = 1e-5  # torch's BatchNorm2d default, which build_model uses


# --- the report ------------------------------------------------------------------


@dataclass
class TransferReport:
    """What moved from parent to child, tensor by tensor.

    ``status``: copied (unchanged parent tensor), morphed (derived from the
    parent or built to preserve its function, e.g. identity layers), fresh
    (random init). ``exact`` says whether the child's function is unchanged
    by that tensor (in eval mode).
    """

    op: str
    parent: str | None
    child: str
    tensors: list[dict] = field(default_factory=list)
    noise: float = 0.0
    notes: list[str] = field(default_factory=list)
    max_abs_logit_diff: float | None = None
    acc_parent: float | None = None
    acc_child: float | None = None

    def add(self, name, shape, status, exact=True, note="", source=None) -> None:
        self.tensors.append({"name": name, "shape": list(shape), "status": status,
                             "exact": bool(exact), "note": note, "source": source})

    @property
    def exact(self) -> bool:
        return all(t["exact"] for t in self.tensors)

    def counts(self) -> dict[str, int]:
        """Trainable parameters per status (BN running stats left out)."""
        counts = {"copied": 0, "morphed": 0, "fresh": 0}
        for t in self.tensors:
            if not _is_buffer(t["name"]):
                counts[t["status"]] += math.prod(t["shape"])
        return counts

    def to_dict(self) -> dict:
        return {**asdict(self), "counts": self.counts(), "exact": self.exact}

    def format(self) -> str:
        """A short table: one line per tensor that was not simply copied."""
        counts = ", ".join(f"{k} {v:,}" for k, v in self.counts().items())
        lines = [f"{self.op}: {self.parent} -> {self.child} (noise {self.noise})",
                 f"  params: {counts}; function-preserving: {self.exact}"]
        for t in self.tensors:
            if t["status"] != "copied" or not t["exact"]:
                shape = "x".join(map(str, t["shape"])) or "scalar"
                exact = "exact" if t["exact"] else "approx"
                lines.append(f"  {t['name']:<28} {shape:<14} {t['status']:<8} "
                             f"{exact:<6} {t['note']}")
        lines += [f"  note: {n}" for n in self.notes]
        if self.max_abs_logit_diff is not None:
            lines.append(f"  drift: max |logit diff| {self.max_abs_logit_diff:.3g}, "
                         f"acc parent {self.acc_parent:.3f} -> "
                         f"child {self.acc_child:.3f}")
        return "\n".join(lines)


def _is_buffer(name: str) -> bool:
    return ".running_" in name or name.endswith("num_batches_tracked")


def _report(op, parent, child, sd, changed) -> TransferReport:
    """Entries for every child tensor; ``changed`` maps name -> entry fields.

    A name not in ``changed`` was copied unchanged from the same parent name.
    """
    report = TransferReport(op, parent.name if parent else None, child.name)
    for name in state_shapes(child):
        entry = changed.get(name, {"status": "copied", "source": name})
        report.add(name, sd[name].shape, **entry)
    return report


def _compose(op, parent, child, reports) -> TransferReport:
    """One report for a chain of ops, following each tensor back to the parent."""
    out = TransferReport(op, parent.name, child.name,
                         noise=max(r.noise for r in reports),
                         notes=[n for r in reports for n in r.notes])
    by_name = [{t["name"]: t for t in r.tensors} for r in reports]
    for t in reports[-1].tensors:
        chain, src, k = [t], t["source"], len(reports) - 2
        while src is not None and k >= 0:
            chain.append(by_name[k][src])
            src, k = chain[-1]["source"], k - 1
        statuses = {c["status"] for c in chain}
        status = "fresh" if "fresh" in statuses else (
            "copied" if statuses == {"copied"} else "morphed")
        notes = dict.fromkeys(c["note"] for c in reversed(chain) if c["note"])
        out.add(t["name"], t["shape"], status, all(c["exact"] for c in chain),
                "; ".join(notes), src if k < 0 else None)
    return out


# --- checks and small helpers --------------------------------------------------


def check_compatible(spec: ModelSpec, sd: dict) -> None:
    """Raise RunnerError listing every tensor that does not fit ``spec``."""
    expected = state_shapes(spec)
    problems = [f"missing {n} {s}" for n, s in expected.items() if n not in sd]
    problems += [f"unexpected {n}" for n in sd if n not in expected]
    for name, shape in expected.items():
        if name not in sd:
            continue
        found = sd[name]
        if not isinstance(found, torch.Tensor):
            problems.append(f"{name} is a {type(found).__name__}, not a tensor")
        elif tuple(found.shape) != shape:
            problems.append(f"{name} expected {shape} found {tuple(found.shape)}")
    if problems:
        raise RunnerError(
            f"weights do not fit spec {spec.name!r}: {'; '.join(problems)}"
        )


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_whole(what: str, value) -> None:
    """Counts and sizes (filters, units, kernel, pool_size) are whole numbers;
    said before any comparison, so 64.5 filters is not called "too few"."""
    if not _is_int(value):
        raise RunnerError(f"{what} must be a whole number, got {value!r}")


def _check_index(what: str, value, size: int) -> None:
    if not _is_int(value) or not 0 <= value < size:
        raise RunnerError(f"{what} must be an index in 0..{size - 1}, got {value!r}")


def _generator(rng) -> torch.Generator | None:
    """None -> torch's global RNG; an int seeds a private generator."""
    if rng is None or isinstance(rng, torch.Generator):
        return rng
    if _is_int(rng):
        return torch.Generator().manual_seed(rng)
    raise RunnerError(
        f"rng must be None, an int seed or a torch.Generator, got {rng!r}")


def _clone(sd: dict) -> dict:
    return {k: v.detach().clone() for k, v in sd.items()}


def _fresh_state(spec: ModelSpec, rng=None) -> dict:
    """build_model's default init, seeded from ``rng`` when one is given."""
    gen = _generator(rng)
    if gen is None:
        return build_model(spec).state_dict()
    seed = int(torch.randint(2**62, (1,), generator=gen))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(spec).state_dict()


def _with_block(spec: ModelSpec, i: int, block: ConvBlock, op: str) -> ModelSpec:
    blocks = list(spec.blocks)
    blocks[i] = block
    return replace(spec, name=f"{spec.name}+{op}", blocks=tuple(blocks))


def _as_spec(target) -> ModelSpec:
    """A target given as a ModelSpec, a known spec name or a spec JSON path."""
    return target if isinstance(target, ModelSpec) else get_spec(target)


def _first_dense(spec: ModelSpec) -> str:
    return "head.0" if spec.dense else "out"


# --- Net2WiderNet ----------------------------------------------------------------


def _replication(old: int, new: int, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit index map (old units first, then random picks) and each one's count."""
    extra = torch.randint(old, (new - old,), generator=gen)
    idx = torch.cat([torch.arange(old), extra])
    counts = torch.bincount(idx, minlength=old).to(torch.float32)
    return idx, counts


def _replicate_rows(sd, names, idx, old, noise, gen) -> list[str]:
    """Outgoing side: new units copy rows; noise (x tensor std) on the copies.

    Returns the names that got noise. Net2Net adds it to break the symmetry
    between a unit and its copies, which otherwise get equal gradients.
    """
    noisy = []
    for name in names:
        t = sd[name][idx].clone()
        if noise and t.dim() > 1:
            scale = noise * float(sd[name].std())
            t[old:] += scale * torch.randn(t[old:].shape, generator=gen)
            noisy.append(name)
        sd[name] = t
    return noisy


def _spread_inputs(sd, name, idx, counts, new_shape) -> None:
    """Incoming side: replicated inputs share their old weight equally.

    Input channel c owns a contiguous group of columns (k*k taps for a conv,
    H*W flatten positions for the first dense layer), hence the reshape.
    """
    w = sd[name]
    groups = w.reshape(w.shape[0], counts.numel(), -1)
    groups = groups[:, idx] / counts[idx].to(w.dtype)[None, :, None]
    sd[name] = groups.reshape(new_shape)


def _conv_names(spec: ModelSpec, i: int, j: int) -> list[str]:
    """Tensors holding conv (i, j)'s output channels as rows."""
    if spec.blocks[i].batchnorm:
        bn = f"blocks.{i}.bns.{j}"
        return [f"blocks.{i}.convs.{j}.weight"] + [
            f"{bn}.{p}" for p in ("weight", "bias", "running_mean", "running_var")]
    return [f"blocks.{i}.convs.{j}.weight", f"blocks.{i}.convs.{j}.bias"]


def _next_weight(spec: ModelSpec, i: int, j: int) -> str:
    """The weight that reads conv (i, j)'s output."""
    if j + 1 < len(spec.blocks[i].convs):
        return f"blocks.{i}.convs.{j + 1}.weight"
    if i + 1 < len(spec.blocks):
        return f"blocks.{i + 1}.convs.0.weight"
    return f"{_first_dense(spec)}.weight"


def _widen(op, spec, child, sd, rows, nxt, old, new, noise, rng):
    """Shared Net2WiderNet step: replicate ``rows``, spread ``nxt``."""
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or noise < 0:
        raise RunnerError(f"{op}: noise must be a number >= 0, got {noise!r}")
    gen = _generator(rng)
    idx, counts = _replication(old, new, gen)
    out = _clone(sd)
    noisy = _replicate_rows(out, rows, idx, old, noise, gen)
    _spread_inputs(out, nxt, idx, counts, state_shapes(child)[nxt])
    changed = {n: {"status": "morphed", "source": n, "exact": n not in noisy,
                   "note": f"{old}->{new} units, replicated"} for n in rows}
    changed[nxt] = {"status": "morphed", "source": nxt,
                    "note": "replicated inputs divided by their count"}
    report = _report(op, spec, child, out, changed)
    report.noise = float(noise)
    return child, out, report


def widen_conv(spec, sd, block, layer, filters, noise=0.0, rng=None):
    """Give conv ``layer`` of ``block`` more ``filters`` (Net2WiderNet)."""
    check_compatible(spec, sd)
    _check_index("widen_conv block", block, len(spec.blocks))
    _check_index("widen_conv layer", layer, len(spec.blocks[block].convs))
    conv = spec.blocks[block].convs[layer]
    _check_whole("widen_conv filters", filters)
    if filters <= conv.filters:
        raise RunnerError(f"widen_conv: block {block} layer {layer} has "
                          f"{conv.filters} filters; filters must be more, "
                          f"got {filters!r}")
    convs = list(spec.blocks[block].convs)
    convs[layer] = replace(conv, filters=filters)
    new_block = replace(spec.blocks[block], convs=tuple(convs))
    child = _with_block(spec, block, new_block, "widen_conv")
    rows = _conv_names(spec, block, layer)
    nxt = _next_weight(spec, block, layer)
    return _widen("widen_conv", spec, child, sd, rows, nxt, conv.filters, filters,
                  noise, rng)


def widen_dense(spec, sd, index, units, noise=0.0, rng=None):
    """Give dense hidden layer ``head.{index}`` more ``units`` (Net2WiderNet)."""
    check_compatible(spec, sd)
    _check_index("widen_dense index", index, len(spec.dense))
    old = spec.dense[index]
    _check_whole("widen_dense units", units)
    if units <= old:
        raise RunnerError(f"widen_dense: head.{index} has {old} units; "
                          f"units must be more, got {units!r}")
    dense = list(spec.dense)
    dense[index] = units
    child = replace(spec, name=f"{spec.name}+widen_dense", dense=tuple(dense))
    rows = [f"head.{index}.weight", f"head.{index}.bias"]
    nxt = f"head.{index + 1}.weight" if index + 1 < len(spec.dense) else "out.weight"
    return _widen("widen_dense", spec, child, sd, rows, nxt, old, units, noise, rng)


# --- Net2DeeperNet ---------------------------------------------------------------


def _identity_conv(sd, prefix, bn_prefix, channels, kernel) -> dict:
    """Write an identity conv (+ eval-mode identity BN); return report entries."""
    w = torch.zeros(channels, channels, kernel, kernel)
    w[torch.arange(channels), torch.arange(channels), kernel // 2, kernel // 2] = 1.0
    sd[f"{prefix}.weight"] = w
    new = {f"{prefix}.weight": "new layer, identity init"}
    if bn_prefix is None:
        sd[f"{prefix}.bias"] = torch.zeros(channels)
        new[f"{prefix}.bias"] = "new layer, zero bias"
    else:
        sd[f"{bn_prefix}.weight"] = torch.full((channels,), math.sqrt(1 + BN_EPS))
        sd[f"{bn_prefix}.bias"] = torch.zeros(channels)
        sd[f"{bn_prefix}.running_mean"] = torch.zeros(channels)
        sd[f"{bn_prefix}.running_var"] = torch.ones(channels)
        sd[f"{bn_prefix}.num_batches_tracked"] = torch.tensor(0)
        for name in sd:
            if name.startswith(f"{bn_prefix}."):
                new[name] = "new BN, identity in eval mode only"
    return {n: {"status": "morphed", "note": note} for n, note in new.items()}


def _shift_layers(sd, block, after) -> tuple[dict, dict]:
    """Rename convs/bns after ``after`` in ``block`` one index up; return sources."""
    out, sources = {}, {}
    head = f"blocks.{block}."
    for name, t in sd.items():
        parts = name.split(".")
        inside = name.startswith(head) and parts[2] in ("convs", "bns")
        if inside and int(parts[3]) > after:
            parts[3] = str(int(parts[3]) + 1)
        out[".".join(parts)] = t
        sources[".".join(parts)] = name
    return out, sources


def deepen_conv(spec, sd, block, after_layer, kernel=3, rng=None):
    """Insert an identity conv after conv ``after_layer`` of ``block``."""
    check_compatible(spec, sd)
    _check_index("deepen_conv block", block, len(spec.blocks))
    old = spec.blocks[block]
    _check_index("deepen_conv after_layer", after_layer, len(old.convs))
    _check_whole("deepen_conv kernel", kernel)
    channels = old.convs[after_layer].filters
    convs = list(old.convs)
    convs.insert(after_layer + 1, ConvLayer(channels, kernel))
    child = _with_block(spec, block, replace(old, convs=tuple(convs)), "deepen_conv")
    out, sources = _shift_layers(_clone(sd), block, after_layer)
    new_j = after_layer + 1
    bn = f"blocks.{block}.bns.{new_j}" if old.batchnorm else None
    changed = _identity_conv(out, f"blocks.{block}.convs.{new_j}", bn, channels, kernel)
    for name, src in sources.items():
        if src != name:
            changed[name] = {"status": "copied", "source": src, "note": f"was {src}"}
    return child, out, _report("deepen_conv", spec, child, out, changed)


def _fold_pooled(w, shape, pool_size) -> tuple[torch.Tensor, str]:
    """First-dense weights on a (C, H, W) layout -> the pooled layout.

    Each pooled feature stands for its window, so it gets the sum of the
    window's weights; equal to the parent where features are constant in a
    window. Floor pooling drops trailing rows/cols: their weights go too.
    """
    c, h, wd = shape
    p = pool_size
    h2, w2 = h // p, wd // p
    grid = w.reshape(w.shape[0], c, h, wd)[:, :, : h2 * p, : w2 * p]
    folded = grid.reshape(w.shape[0], c, h2, p, w2, p).sum(dim=(3, 5))
    note = f"summed over {p}x{p} pool windows ({h}x{wd} -> {h2}x{w2})"
    if h2 * p != h or w2 * p != wd:
        note += (f"; floor pooling drops the last {h - h2 * p} row(s) and "
                 f"{wd - w2 * p} col(s), and their weights")
    return folded.reshape(w.shape[0], c * h2 * w2), note


def _fold_head(spec: ModelSpec, sd: dict, pool_size: int) -> dict:
    """Fold the first dense weight in ``sd`` onto the pooled flatten."""
    name = f"{_first_dense(spec)}.weight"
    sd[name], note = _fold_pooled(sd[name], feature_shape(spec), pool_size)
    note += "; exact only if features are constant within each window"
    return {name: {"status": "morphed", "exact": False, "source": name, "note": note}}


def deepen_block(spec, sd, filters=None, pool="max", pool_size=2, kernel=3,
                 batchnorm=None, noise=0.0, rng=None):
    """Append an identity conv + pool block; more ``filters`` widen it after.

    ``batchnorm`` defaults to the last block's setting.
    """
    check_compatible(spec, sd)
    if not spec.blocks:
        # the raw input may be negative, so an identity conv + ReLU is not exact
        raise RunnerError("deepen_block needs a spec with at least one conv block")
    for name, value in (("kernel", kernel), ("pool_size", pool_size)):
        _check_whole(f"deepen_block {name}", value)
    if filters is not None:
        _check_whole("deepen_block filters", filters)
    channels = feature_shape(spec)[0]
    if filters is not None and filters < channels:
        raise RunnerError(f"deepen_block: filters must be >= the last block's "
                          f"{channels} channels, got {filters!r}")
    bn = spec.blocks[-1].batchnorm if batchnorm is None else batchnorm
    block = ConvBlock((ConvLayer(channels, kernel),), pool, pool_size, bn)
    child = replace(spec, name=f"{spec.name}+deepen_block",
                    blocks=(*spec.blocks, block))
    out = _clone(sd)
    i = len(spec.blocks)
    bn_prefix = f"blocks.{i}.bns.0" if bn else None
    changed = _identity_conv(out, f"blocks.{i}.convs.0", bn_prefix, channels, kernel)
    if pool != "none":
        changed.update(_fold_head(spec, out, pool_size))
    report = _report("deepen_block", spec, child, out, changed)
    if filters is None or filters == channels:
        return child, out, report
    wider, wsd, wrep = widen_conv(child, out, i, 0, filters, noise=noise, rng=rng)
    wider = replace(wider, name=child.name)
    return wider, wsd, _compose("deepen_block", spec, wider, [report, wrep])


# --- plain copy and fresh --------------------------------------------------------


def _layer_suffix(name: str) -> str:
    parts = name.split(".")
    return f"{parts[2]}.{parts[4]}"


def _param_layers(spec: ModelSpec) -> list[tuple[str, dict[str, tuple]]]:
    """Parametric layers in Keras order: convs, dense hidden, out.

    Each is (kind, {suffix: full name}); a conv's BN tensors belong to it.
    """
    shapes = state_shapes(spec)
    layers = []
    for i, block in enumerate(spec.blocks):
        for j in range(len(block.convs)):
            mine = (f"blocks.{i}.convs.{j}.", f"blocks.{i}.bns.{j}.")
            # suffix "convs.weight", "bns.running_mean", ...: comparable across layers
            layers.append(("conv", {_layer_suffix(n): n for n in shapes
                                    if n.startswith(mine)}))
    # the out layer is a Dense like any other in the Keras model
    for prefix in [f"head.{k}" for k in range(len(spec.dense))] + ["out"]:
        layers.append(("dense", {s: f"{prefix}.{s}" for s in ("weight", "bias")}))
    return layers


def plain_copy(spec, sd, target_spec, rng=None):
    """The original Keras transfer: copy the i-th layer where kind and shapes match.

    Everything else keeps build_model's default (fresh) init.
    """
    check_compatible(spec, sd)
    target_spec = _as_spec(target_spec)
    out = _fresh_state(target_spec, rng)
    parent_layers, shapes = _param_layers(spec), state_shapes(spec)
    child_shapes = state_shapes(target_spec)
    changed = {n: {"status": "fresh", "exact": False, "note": "default init"}
               for n in child_shapes}
    for k, (kind, names) in enumerate(_param_layers(target_spec)):
        if k >= len(parent_layers) or parent_layers[k][0] != kind:
            continue
        pnames = parent_layers[k][1]
        same = pnames.keys() == names.keys() and all(
            shapes[pnames[s]] == child_shapes[n] for s, n in names.items())
        for s, n in names.items() if same else ():
            out[n] = sd[pnames[s]].detach().clone()
            changed[n] = {"status": "copied", "source": pnames[s],
                          "note": f"layer {k} by position"}
    return target_spec, out, _report("plain_copy", spec, target_spec, out, changed)


def fresh(target_spec: ModelSpec, seed: int | None = None):
    """Start over: build_model's default init, seeded by ``seed``."""
    target_spec = _as_spec(target_spec)
    sd = _fresh_state(target_spec, seed)
    changed = {n: {"status": "fresh", "exact": False, "note": "default init"}
               for n in state_shapes(target_spec)}
    return target_spec, sd, _report("fresh", None, target_spec, sd, changed)


def _fresh_op(spec, sd, target_spec, seed=None, rng=None):
    child, out, report = fresh(target_spec, seed if seed is not None else rng)
    report.parent = spec.name
    return child, out, report


# --- reaching a target spec ------------------------------------------------------


def _align(pconvs, tconvs) -> list[int] | None:
    """Target positions of the parent's convs, or None if none work.

    The first conv cannot move (an identity conv before it would see the raw
    input); convs in between are inserted identities, so they must be at least
    as wide as the conv they follow; kernels must match.
    """
    n, m = len(pconvs), len(tconvs)
    for rest in itertools.combinations(range(1, m), n - 1):
        pos = [0, *rest]
        ok = all(tconvs[q].kernel == p.kernel and tconvs[q].filters >= p.filters
                 for p, q in zip(pconvs, pos))
        for q in range(m):
            before = max(j for j, pq in enumerate(pos) if pq <= q)
            ok = ok and tconvs[q].filters >= pconvs[before].filters
        if ok:
            return pos
    return None


def _plan(parent: ModelSpec, target: ModelSpec) -> tuple[list, list[str]]:
    """Structural ops (deepen_conv, deepen_block) and the problems found."""
    problems = [f"{f} {getattr(parent, f)} -> {getattr(target, f)}"
                for f in ("input_size", "in_channels", "num_outputs")
                if getattr(parent, f) != getattr(target, f)]
    if len(target.blocks) < len(parent.blocks):
        problems.append(f"{len(parent.blocks)} blocks -> {len(target.blocks)}")
    if len(target.dense) != len(parent.dense):
        problems.append(f"head depth {len(parent.dense)} -> {len(target.dense)} "
                        "(only widening the head is supported)")
    problems += [f"head.{k} {a} -> {b} units (narrower)"
                 for k, (a, b) in enumerate(zip(parent.dense, target.dense)) if b < a]
    ops = []
    for i, (pb, tb) in enumerate(zip(parent.blocks, target.blocks)):
        ops += _plan_block(i, pb, tb, problems)
    channels = feature_shape(parent)[0]
    for i, tb in enumerate(target.blocks[len(parent.blocks):], len(parent.blocks)):
        if min(c.filters for c in tb.convs) < channels:
            problems.append(f"new block {i} has convs narrower than {channels}")
        ops.append(("deepen_block", {"pool": tb.pool, "pool_size": tb.pool_size,
                                     "kernel": tb.convs[0].kernel,
                                     "batchnorm": tb.batchnorm}))
        ops += [("deepen_conv", {"block": i, "after_layer": q - 1,
                                 "kernel": tb.convs[q].kernel})
                for q in range(1, len(tb.convs))]
    return ops, problems


def _plan_block(i, pb: ConvBlock, tb: ConvBlock, problems: list) -> list:
    before = (pb.pool, pb.pool_size, pb.batchnorm)
    after = (tb.pool, tb.pool_size, tb.batchnorm)
    if before != after:
        problems.append(f"block {i} (pool, pool_size, batchnorm) {before} -> {after}")
    pos = _align(pb.convs, tb.convs)
    if pos is None:
        problems.append(f"block {i} convs {_show(pb.convs)} cannot grow into "
                        f"{_show(tb.convs)}")
        return []
    return [("deepen_conv", {"block": i, "after_layer": q - 1,
                             "kernel": tb.convs[q].kernel})
            for q in range(len(tb.convs)) if q not in pos]


def _show(convs) -> str:
    return "[" + ", ".join(f"{c.filters}@{c.kernel}x{c.kernel}" for c in convs) + "]"


def _widen_ops(current: ModelSpec, target: ModelSpec) -> list:
    """widen_conv / widen_dense ops that bring ``current`` to ``target``'s widths."""
    ops = []
    for i, (cb, tb) in enumerate(zip(current.blocks, target.blocks)):
        pairs = enumerate(zip(cb.convs, tb.convs))
        ops += [("widen_conv", {"block": i, "layer": j, "filters": t.filters})
                for j, (c, t) in pairs if t.filters > c.filters]
    ops += [("widen_dense", {"index": k, "units": b})
            for k, (a, b) in enumerate(zip(current.dense, target.dense)) if b > a]
    return ops


def _shape_diff(parent: ModelSpec, target: ModelSpec) -> str:
    ps, ts = state_shapes(parent), state_shapes(target)
    diffs = [f"{n} {ps.get(n)} vs {ts.get(n)}" for n in dict.fromkeys([*ps, *ts])
             if ps.get(n) != ts.get(n) and not n.endswith("num_batches_tracked")]
    return ", ".join(diffs) or "none"


def _function_preserving(spec, sd, target, rng):
    ops, problems = _plan(spec, target)
    if problems:
        raise RunnerError(
            f"cannot grow {spec.name!r} into {target.name!r} with function-preserving "
            f"ops: {'; '.join(problems)}; mismatched tensors (parent vs target): "
            f"{_shape_diff(spec, target)}; use kind plain_copy or fresh instead")
    gen = _generator(rng)
    current, weights, reports = spec, sd, []
    # deepen first, so inserted identities take the parent's widths, then widen
    for name, params in ops:
        current, weights, report = apply_op(current, weights, name, rng=gen, **params)
        reports.append(report)
    for name, params in _widen_ops(current, target):
        current, weights, report = apply_op(current, weights, name, rng=gen, **params)
        reports.append(report)
    child = replace(current, name=target.name, dropout=target.dropout)
    if child != target:  # the plan missed something: a bug, not a user error
        raise AssertionError(f"planned child {child} differs from target {target}")
    if not reports:
        return child, _clone(sd), _report("function_preserving", spec, child, sd, {})
    op = "+".join(r.op for r in reports)
    return child, weights, _compose(op, spec, child, reports)


GROWTH_STEPS = ("widen_conv", "widen_dense", "deepen_conv", "deepen_block")


def combine(spec, sd, steps, rng=None):
    """Several growth ops in one child, each applied to what the one before
    made (e.g. deepen, then widen the new head): ``steps`` is a list of
    ``{"op": name, **params}``. The report follows every tensor back through
    the chain to the parent."""
    if not isinstance(steps, list) or not steps:
        raise RunnerError("combine: steps must be a non-empty list of ops")
    gen = _generator(rng)
    current, weights, reports = spec, sd, []
    for i, step in enumerate(steps):
        name = step.get("op") if isinstance(step, dict) else None
        if name not in GROWTH_STEPS:
            raise RunnerError(f"combine: step {i + 1} ({step!r}) needs op: one of "
                              f"{', '.join(GROWTH_STEPS)}")
        params = {k: v for k, v in step.items() if k != "op"}
        current, weights, report = apply_op(current, weights, name, rng=gen, **params)
        reports.append(report)
    return current, weights, _compose("+".join(r.op for r in reports), spec, current,
                                      reports)


TRANSFER_KINDS = ("function_preserving", "plain_copy", "fresh")


def transfer_to(spec, sd, target_spec, kind="function_preserving", rng=None):
    """Turn the parent into ``target_spec`` the way ``kind`` says.

    function_preserving raises RunnerError (listing the mismatched layers)
    when no sequence of widen/deepen ops reaches the target; plain_copy and
    fresh always work.
    """
    if kind == "function_preserving":
        check_compatible(spec, sd)
        return _function_preserving(spec, sd, _as_spec(target_spec), rng)
    if kind == "plain_copy":
        return plain_copy(spec, sd, target_spec, rng=rng)
    if kind == "fresh":
        return _fresh_op(spec, sd, target_spec, rng=rng)
    known = ", ".join(TRANSFER_KINDS)
    raise RunnerError(f"unknown transfer kind {kind!r}; known: {known}")


OPS = {
    "widen_conv": widen_conv,
    "widen_dense": widen_dense,
    "deepen_conv": deepen_conv,
    "deepen_block": deepen_block,
    "plain_copy": plain_copy,
    "fresh": _fresh_op,
    "combine": combine,
}


def apply_op(spec, sd, op_name, **params):
    """Run the op called ``op_name``; bad names or parameters raise RunnerError."""
    if op_name not in OPS:
        raise RunnerError(f"unknown growth op {op_name!r}; known: {', '.join(OPS)}")
    op = OPS[op_name]
    allowed = list(inspect.signature(op).parameters)[2:]
    unknown = sorted(set(params) - set(allowed))
    try:
        if unknown:
            raise TypeError(f"unknown parameter(s) {', '.join(unknown)}")
        inspect.signature(op).bind(spec, sd, **params)
    except TypeError as err:
        raise RunnerError(f"growth op {op_name}: {err}; parameters: "
                          f"{', '.join(allowed)}") from err
    return op(spec, sd, **params)


# --- measuring what the transfer did -------------------------------------------


@torch.no_grad()
def _logits(spec, sd, images, batch_size) -> torch.Tensor:
    model = build_model(spec)
    model.load_state_dict(sd)
    model.eval()
    return torch.cat([model(x) for x in torch.split(images, batch_size)])


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    if logits.shape[1] == 1:
        pred = (logits[:, 0] > 0).long()
    else:
        pred = logits.argmax(dim=1)
    return float((pred == labels.long()).float().mean())


def measure_drift(parent_spec, parent_sd, child_spec, child_sd, images, labels,
                  report=None, batch_size=256) -> TransferReport:
    """Compare parent and child logits (eval mode) on ``images``.

    Fills ``report`` (or a new one) with the max |logit difference| and both
    accuracies, and returns it.
    """
    if report is None:
        report = TransferReport("measure", parent_spec.name, child_spec.name)
    a = _logits(parent_spec, parent_sd, images, batch_size)
    b = _logits(child_spec, child_sd, images, batch_size)
    if a.shape != b.shape:
        raise RunnerError(f"parent logits {tuple(a.shape)} and child logits "
                          f"{tuple(b.shape)} cannot be compared")
    report.max_abs_logit_diff = float((a - b).abs().max())
    report.acc_parent = _accuracy(a, labels)
    report.acc_child = _accuracy(b, labels)
    return report
