"""Model specs: plain, JSON-able data that say what network to build.

A :class:`ModelSpec` is a stem-less CNN: conv *blocks* (each a few 'same'
convs with ReLU, optional BatchNorm, then a pool), Flatten in torch's C,H,W
order, a *head* of dense ReLU layers, and an ``out`` layer of logits.
:func:`build_model` keeps state-dict names stable (``blocks.{i}.convs.{j}``,
``blocks.{i}.bns.{j}``, ``head.{k}``, ``out``) so growth ops and checkpoints
can address tensors by name.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn
from torch.nn import functional as F

from runner.errors import RunnerError

POOLS = ("max", "avg", "none")


def _check_int(where: str, value, minimum: int) -> None:
    # bool is an int subclass; a JSON `true` for a size is a user mistake
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RunnerError(f"{where} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class ConvLayer:
    """One 3x3-style conv with 'same' padding and ReLU after it."""

    filters: int
    kernel: int = 3  # odd, so 'same' padding is symmetric and identity exists

    def __post_init__(self):
        _check_int("conv filters", self.filters, 1)
        _check_int("conv kernel", self.kernel, 1)
        if self.kernel % 2 == 0:
            raise RunnerError(f"conv kernel must be odd, got {self.kernel}")


@dataclass(frozen=True)
class ConvBlock:
    """Conv layers, then one pool; BatchNorm (if on) sits before each ReLU."""

    convs: tuple[ConvLayer, ...]
    pool: str = "max"  # "max" | "avg" | "none"
    pool_size: int = 2  # window and stride; floor division of the size
    batchnorm: bool = False

    def __post_init__(self):
        object.__setattr__(self, "convs", tuple(self.convs))
        if not self.convs:
            raise RunnerError("a conv block needs at least one conv layer")
        if not all(isinstance(c, ConvLayer) for c in self.convs):
            raise RunnerError("block convs must be ConvLayer entries")
        if self.pool not in POOLS:
            allowed = ", ".join(POOLS)
            raise RunnerError(f"pool must be one of {allowed}, got {self.pool!r}")
        _check_int("pool_size", self.pool_size, 1)
        if not isinstance(self.batchnorm, bool):
            got = self.batchnorm
            raise RunnerError(f"batchnorm must be true or false, got {got!r}")

    def out_size(self, size: int) -> int:
        return size if self.pool == "none" else size // self.pool_size


@dataclass(frozen=True)
class ModelSpec:
    """A whole network; validated when built so a bad spec fails early."""

    name: str
    input_size: int = 64  # pixels, square images
    in_channels: int = 3
    blocks: tuple[ConvBlock, ...] = ()
    dense: tuple[int, ...] = (128,)  # hidden widths of the head
    dropout: float = 0.0  # after each hidden dense layer; identity in eval
    num_outputs: int = 1  # 1 = one binary logit

    def __post_init__(self):
        object.__setattr__(self, "blocks", tuple(self.blocks))
        object.__setattr__(self, "dense", tuple(self.dense))
        if not isinstance(self.name, str) or not self.name:
            got = self.name
            raise RunnerError(f"spec name must be a non-empty string, got {got!r}")
        _check_int("input_size", self.input_size, 1)
        _check_int("in_channels", self.in_channels, 1)
        _check_int("num_outputs", self.num_outputs, 1)
        for k, units in enumerate(self.dense):
            _check_int(f"dense[{k}]", units, 1)
        if not all(isinstance(b, ConvBlock) for b in self.blocks):
            raise RunnerError("spec blocks must be ConvBlock entries")
        dropout_ok = isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1
        if isinstance(self.dropout, bool) or not dropout_ok:
            raise RunnerError(f"dropout must be in [0, 1), got {self.dropout!r}")
        self._check_sizes()

    def _check_sizes(self) -> None:
        size = self.input_size
        for i, block in enumerate(self.blocks):
            size = block.out_size(size)
            if size < 1:
                raise RunnerError(
                    f"spec {self.name!r}: block {i} pools the image to nothing "
                    f"(input_size {self.input_size} is too small for the pools)"
                )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        """Inverse of :meth:`to_dict`; names unknown or invalid fields."""
        d = _known_fields(cls, d, "model spec")
        raw_blocks = d.pop("blocks", [])
        if not isinstance(raw_blocks, (list, tuple)):
            raise RunnerError(f"model spec field 'blocks' must be a list, got "
                              f"{raw_blocks!r}")
        blocks = [_block_from_dict(b, i) for i, b in enumerate(raw_blocks)]
        dense = d.pop("dense", (128,))
        if not isinstance(dense, (list, tuple)):
            raise RunnerError(f"model spec field 'dense' must be a list, got {dense!r}")
        try:
            return cls(blocks=tuple(blocks), dense=tuple(dense), **d)
        except TypeError as err:  # a required field is missing
            raise RunnerError(f"model spec: {err}") from err


def _known_fields(cls, d, where: str) -> dict:
    if not isinstance(d, dict):
        raise RunnerError(f"{where} must be a JSON object, got {type(d).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise RunnerError(
            f"{where}: unknown field(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(known))}"
        )
    return dict(d)


def _block_from_dict(d, i: int) -> ConvBlock:
    d = _known_fields(ConvBlock, d, f"block {i}")
    convs = d.pop("convs", None)
    if not isinstance(convs, (list, tuple)):
        raise RunnerError(f"block {i}: field 'convs' must be a list, got {convs!r}")
    layers = []
    for j, c in enumerate(convs):
        c = _known_fields(ConvLayer, c, f"block {i} conv {j}")
        try:
            layers.append(ConvLayer(**c))
        except TypeError as err:
            raise RunnerError(f"block {i} conv {j}: {err}") from err
    return ConvBlock(convs=tuple(layers), **d)


# --- the two reference networks --------------------------------------------


def classifier_1() -> ModelSpec:
    """Conv 32 + MaxPool, Dense 128, Dense 1: 4,195,457 params at 64x64x3."""
    block = ConvBlock(convs=(ConvLayer(32),), pool="max")
    return ModelSpec(name="classifier_1", blocks=(block,), dense=(128,))


def classifier_2() -> ModelSpec:
    """Two conv-32 blocks: 1,058,977 params, the flatten is 4x smaller."""
    block = ConvBlock(convs=(ConvLayer(32),), pool="max")
    return ModelSpec(name="classifier_2", blocks=(block, block), dense=(128,))


SPECS = {"classifier_1": classifier_1(), "classifier_2": classifier_2()}


def get_spec(name_or_path: str | os.PathLike) -> ModelSpec:
    """A known spec by name, or one read from a JSON file."""
    key = str(name_or_path)
    if key in SPECS:
        return SPECS[key]
    if not os.path.isfile(key):
        raise RunnerError(
            f"unknown model spec {key!r}; known: {', '.join(sorted(SPECS))} "
            "(or give the path of a spec JSON file)"
        )
    try:
        with open(key, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as err:
        raise RunnerError(f"cannot read model spec {key}: {err}") from err
    return ModelSpec.from_dict(data)


# --- shapes, sizes and cost --------------------------------------------------


def feature_shape(spec: ModelSpec) -> tuple[int, int, int]:
    """(C, H, W) of the features just before Flatten."""
    channels, size = spec.in_channels, spec.input_size
    for block in spec.blocks:
        channels = block.convs[-1].filters
        size = block.out_size(size)
    return channels, size, size


def layer_sizes(spec: ModelSpec) -> list[tuple[int, int]]:
    """(fan_in, fan_out) of the head's dense layers, ``out`` last."""
    c, h, w = feature_shape(spec)
    widths = [c * h * w, *spec.dense, spec.num_outputs]
    return list(zip(widths[:-1], widths[1:]))


def state_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every state-dict name :func:`build_model` makes, with its shape."""
    shapes: dict[str, tuple[int, ...]] = {}
    cin = spec.in_channels
    for i, block in enumerate(spec.blocks):
        for j, conv in enumerate(block.convs):
            prefix = f"blocks.{i}.convs.{j}"
            shapes[f"{prefix}.weight"] = (conv.filters, cin, conv.kernel, conv.kernel)
            if block.batchnorm:
                for part in ("weight", "bias", "running_mean", "running_var"):
                    shapes[f"blocks.{i}.bns.{j}.{part}"] = (conv.filters,)
                shapes[f"blocks.{i}.bns.{j}.num_batches_tracked"] = ()
            else:
                shapes[f"{prefix}.bias"] = (conv.filters,)
            cin = conv.filters
    names = [f"head.{k}" for k in range(len(spec.dense))] + ["out"]
    for name, (fan_in, fan_out) in zip(names, layer_sizes(spec)):
        shapes[f"{name}.weight"] = (fan_out, fan_in)
        shapes[f"{name}.bias"] = (fan_out,)
    return shapes


def num_params(spec: ModelSpec) -> int:
    """Trainable parameters (BatchNorm running statistics are not counted)."""
    total = 0
    for name, shape in state_shapes(spec).items():
        if "running_" in name or name.endswith("num_batches_tracked"):
            continue
        total += int(torch.Size(shape).numel())
    return total


def flops_per_image(spec: ModelSpec) -> int:
    """Forward FLOPs of one image: 2 x multiply-adds of convs and dense layers.

    Pools, ReLU and BatchNorm are left out; they are a rounding error here.
    """
    total, cin, size = 0, spec.in_channels, spec.input_size
    for block in spec.blocks:
        for conv in block.convs:
            total += 2 * cin * conv.kernel**2 * conv.filters * size * size
            cin = conv.filters
        size = block.out_size(size)
    return total + sum(2 * fan_in * fan_out for fan_in, fan_out in layer_sizes(spec))


def train_flops_per_image(spec: ModelSpec) -> int:
    # backward costs about twice the forward (grads for inputs and weights)
    return 3 * flops_per_image(spec)


# --- the torch module ---------------------------------------------------------


class Block(nn.Module):
    """convs (+ bns) with ReLU, then the pool.

    With max pooling the block's last ReLU runs after the pool instead of
    before it: both are monotone, so the values and gradients are the same,
    but the ReLU (forward and backward) touches a quarter of the elements.
    On CPU, where these element-wise passes over the biggest activations are
    memory-bound, that is about a third of a training step. The ReLUs work in
    place: neither a conv, a BatchNorm nor a max pool keeps its output for the
    backward pass.
    """

    def __init__(self, cin: int, block: ConvBlock):
        super().__init__()
        self.convs = nn.ModuleList()
        for conv in block.convs:
            pad = conv.kernel // 2
            layer = nn.Conv2d(cin, conv.filters, conv.kernel, padding=pad,
                              bias=not block.batchnorm)
            self.convs.append(layer)
            cin = conv.filters
        if block.batchnorm:
            self.bns = nn.ModuleList(nn.BatchNorm2d(c.filters) for c in block.convs)
        else:
            self.bns = None
        self.pool = _pool(block)
        self.relu_after_pool = block.pool == "max"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.convs) - 1
        for j, conv in enumerate(self.convs):
            x = conv(x)
            if self.bns is not None:
                x = self.bns[j](x)
            if j < last or not self.relu_after_pool:
                x = F.relu(x, inplace=True)
        x = self.pool(x)
        return F.relu(x, inplace=True) if self.relu_after_pool else x


def _pool(block: ConvBlock) -> nn.Module:
    if block.pool == "max":
        return nn.MaxPool2d(block.pool_size)
    if block.pool == "avg":
        return nn.AvgPool2d(block.pool_size)
    return nn.Identity()


class Classifier(nn.Module):
    """blocks -> flatten (C,H,W) -> head (dense + ReLU + dropout) -> out."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.blocks = nn.ModuleList()
        cin = spec.in_channels
        for block in spec.blocks:
            self.blocks.append(Block(cin, block))
            cin = block.convs[-1].filters
        sizes = layer_sizes(spec)
        self.head = nn.ModuleList(nn.Linear(i, o) for i, o in sizes[:-1])
        self.dropout = nn.Dropout(spec.dropout)
        self.out = nn.Linear(*sizes[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        # flatten follows the logical C,H,W order even for channels_last input
        x = torch.flatten(x, 1)
        for layer in self.head:
            x = self.dropout(F.relu(layer(x)))
        return self.out(x)


def build_model(spec: ModelSpec) -> Classifier:
    return Classifier(spec)
