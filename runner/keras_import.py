"""Keras weights (.h5) -> a runner checkpoint of the same architecture.

The file is read with h5py alone; Keras is not needed. Two layouts are
recognised, from what the file holds:

- Keras 3 (and tf.keras 2.13+) ``model.save_weights("m.weights.h5")``:
  ``layers/<layer>/vars/0`` (kernel), ``vars/1`` (bias). Layer groups are
  named after the layer class, numbered in model order (``conv2d``,
  ``conv2d_1``, ... ``dense``, ``dense_1``); HDF5 lists them alphabetically,
  so they are put back in order by that number.
- Keras 2 / tf.keras HDF5, and the legacy full-model ``model.save("m.h5")``
  that Keras 3 still writes: ``model_weights/<layer>/.../kernel:0`` (or the
  same at the file's root for ``save_weights``), in the order of the
  ``layer_names`` attribute, each layer's arrays in its ``weight_names`` order.

Layers with weights are matched to the spec in order: layers whose kernel is
4-D are the Conv2D layers (``blocks.{i}.convs.{j}``), 2-D the Dense layers
(``head.{k}``, then ``out``). Pooling, Flatten and Dropout layers have no
weights (Dropout's rate comes from the spec). Every shape is checked against
the spec in Keras's layout before anything is converted:

- Conv2D kernel ``(kh, kw, in, out)`` -> torch ``(out, in, kh, kw)``. Both
  libraries correlate without flipping the kernel, and 'same' padding of an
  odd kernel is the symmetric padding the spec's convs use.
- Dense kernel ``(in, out)`` -> torch ``(out, in)``.
- Flatten: Keras is channels_last, so the vector feeding the first Dense layer
  is in (H, W, C) order; torch flattens (C, H, W). That layer's input rows are
  permuted: reshape to (H, W, C, out), move C first, reshape back.
- A Dense(1, activation="sigmoid") output layer and runner's ``out`` logit are
  the same weights: the sigmoid is applied after them (runner applies it in
  predict, evaluate and the loss), so nothing changes. A layer saved without a
  bias (``use_bias=False``) gets a zero bias, the same function.

Inputs match too: runner feeds RGB pixels in [0, 1] (the original's
``rescale=1./255``), and classes are indexed in sorted folder order, as
Keras's ``flow_from_directory`` does. Specs with BatchNorm are refused: Keras's
BatchNormalization uses another epsilon, so its statistics would not carry
over exactly.
"""

from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from runner.errors import RunnerError
from runner.model.checkpoint import _sha256
from runner.model.growth import check_compatible
from runner.model.spec import ModelSpec, feature_shape, layer_sizes

KERAS3 = "keras3 .weights.h5"
LEGACY = "keras hdf5 (keras 2 / tf.keras / legacy model.save)"
DEFAULT_CLASSES = ("cats", "dogs")
DEFAULT_BASE_SIZE = 72  # px, ingest's default stored size


@dataclass
class KerasLayer:
    """One Keras layer that has weights: its name and arrays (kernel first)."""

    name: str
    arrays: list[np.ndarray]

    @property
    def kind(self) -> str:
        return {4: "Conv2D", 2: "Dense"}.get(self.arrays[0].ndim, "other")


# --- reading the file ------------------------------------------------------------


def read_keras_weights(path) -> tuple[str, list[KerasLayer]]:
    """(layout, layers with weights in model order) of a Keras .h5 file."""
    h5py = _h5py()
    _check_file(path, h5py)
    try:
        with h5py.File(path, "r") as f:
            if isinstance(f.get("layers"), h5py.Group):
                return KERAS3, _keras3_layers(f["layers"], path, h5py)
            if isinstance(f.get("model_weights"), h5py.Group):
                return LEGACY, _legacy_layers(f["model_weights"], path)
            if "layer_names" in f.attrs:
                return LEGACY, _legacy_layers(f, path)
    except (OSError, KeyError, ValueError) as err:
        raise RunnerError(f"{path}: cannot read the Keras weights ({err})") from err
    raise RunnerError(f"{path}: an HDF5 file but not Keras weights (no layers/ "
                      "group, no model_weights/ group, no layer_names)")


def _h5py():
    try:
        import h5py
    except ImportError as err:
        raise RunnerError("import-keras needs h5py: pip install 'runner[keras]'") \
            from err
    return h5py


def _check_file(path, h5py) -> None:
    p = Path(path)
    if not p.exists():
        raise RunnerError(f"{path}: no such file")
    if p.is_dir():
        raise RunnerError(f"{path}: is a folder, not a Keras weights file")
    try:
        is_hdf5 = h5py.is_hdf5(p)
    except OSError as err:
        raise RunnerError(f"{path}: cannot read ({err})") from err
    if not is_hdf5:
        hint = (" (a .keras file is a zip archive; the model.weights.h5 inside it "
                "is the file to import)" if zipfile.is_zipfile(p) else "")
        raise RunnerError(f"{path}: not an HDF5 file; expected Keras weights saved "
                          f"as .weights.h5 or .h5{hint}")


def _order(name: str) -> tuple[str, int]:
    """``conv2d_10`` -> ("conv2d", 10): Keras 3 numbers same-class layers."""
    match = re.fullmatch(r"(.*?)_(\d+)", name)
    return (match[1], int(match[2])) if match else (name, 0)


def _keras3_layers(group, path, h5py) -> list[KerasLayer]:
    layers = []
    for key in sorted(group, key=_order):
        layer = group[key]
        if not isinstance(layer, h5py.Group):
            continue
        if "layers" in layer:
            raise RunnerError(f"{path}: layer {key!r} is a nested model; save the "
                              "weights of a model with the layers side by side")
        variables = layer.get("vars")
        if not isinstance(variables, h5py.Group) or not len(variables):
            continue
        keys = sorted(variables, key=int)
        arrays = [_array(variables[k], path, f"{key}/vars/{k}") for k in keys]
        layers.append(KerasLayer(key, arrays))
    return layers


def _legacy_layers(group, path) -> list[KerasLayer]:
    layers = []
    for name in _strings(group.attrs["layer_names"]):
        weights = _strings(group[name].attrs.get("weight_names", []))
        if weights:
            arrays = [_array(group[name][w], path, w) for w in weights]
            layers.append(KerasLayer(name, arrays))
    return layers


def _strings(values) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def _array(dataset, path, name: str) -> np.ndarray:
    data = np.asarray(dataset[()])
    if data.dtype.kind != "f":
        raise RunnerError(f"{path}: weight {name} holds {data.dtype}, not floats")
    return data.astype(np.float32)


# --- matching and converting ------------------------------------------------------


Targets = list[tuple[str, tuple]]  # (torch layer name, Keras kernel shape)


def _targets(spec: ModelSpec) -> tuple[Targets, Targets]:
    """The spec's conv layers and dense layers, each as :data:`Targets`."""
    convs, cin = [], spec.in_channels
    for i, block in enumerate(spec.blocks):
        for j, conv in enumerate(block.convs):
            shape = (conv.kernel, conv.kernel, cin, conv.filters)
            convs.append((f"blocks.{i}.convs.{j}", shape))
            cin = conv.filters
    names = [f"head.{k}" for k in range(len(spec.dense))] + ["out"]
    dense = [(n, (fan_in, fan_out)) for n, (fan_in, fan_out)
             in zip(names, layer_sizes(spec))]
    return convs, dense


def _check_counts(path, spec, convs, dense, targets) -> None:
    def names(layers):
        return ", ".join(layer.name for layer in layers) or "none"

    if (len(convs), len(dense)) != (len(targets[0]), len(targets[1])):
        raise RunnerError(
            f"{path} has {len(convs)} Conv2D layer(s) ({names(convs)}) and "
            f"{len(dense)} Dense layer(s) ({names(dense)}); spec {spec.name} has "
            f"{len(targets[0])} Conv2D and {len(targets[1])} Dense")


def _check_layer(path, spec, layer: KerasLayer, torch_name: str, want,
                 first_dense: bool) -> None:
    where = f"{path}: layer {layer.name!r} ({layer.kind}, for {torch_name})"
    if len(layer.arrays) > 2:
        raise RunnerError(f"{where} has {len(layer.arrays)} weight arrays; expected "
                          "a kernel and a bias")
    kernel = tuple(layer.arrays[0].shape)
    if kernel != want:
        hint = (" (the flattened features differ: check the Keras model's input "
                "size, padding='same' and pools)"
                if first_dense else "")
        raise RunnerError(f"{where}: kernel shape {kernel}, spec {spec.name} needs "
                          f"{want}{hint}")
    if len(layer.arrays) == 2 and tuple(layer.arrays[1].shape) != (want[-1],):
        raise RunnerError(f"{where}: bias shape {tuple(layer.arrays[1].shape)}, "
                          f"spec {spec.name} needs {(want[-1],)}")


def _bias(layer: KerasLayer, units: int) -> torch.Tensor:
    if len(layer.arrays) == 2:
        return torch.from_numpy(layer.arrays[1].copy())
    return torch.zeros(units)  # use_bias=False: a zero bias is the same function


def _conv(layer: KerasLayer) -> torch.Tensor:
    # (kh, kw, in, out) -> (out, in, kh, kw)
    return torch.from_numpy(np.ascontiguousarray(layer.arrays[0].transpose(3, 2, 0, 1)))


def _dense(layer: KerasLayer, flatten_chw: tuple[int, int, int] | None) -> torch.Tensor:
    """(in, out) -> (out, in); the first Dense's rows go from H,W,C to C,H,W."""
    kernel = layer.arrays[0]
    if flatten_chw is not None:
        c, h, w = flatten_chw
        kernel = kernel.reshape(h, w, c, -1).transpose(2, 0, 1, 3)
        kernel = kernel.reshape(c * h * w, -1)
    return torch.from_numpy(np.ascontiguousarray(kernel.T))


def to_state_dict(spec: ModelSpec, layers: list[KerasLayer], path) -> tuple[dict, dict]:
    """(state dict for ``build_model(spec)``, torch layer -> Keras layer name)."""
    if any(block.batchnorm for block in spec.blocks):
        raise RunnerError(f"spec {spec.name} has BatchNorm; import-keras handles "
                          "specs of Conv2D and Dense layers only")
    odd = [layer for layer in layers if layer.kind == "other"]
    if odd:
        shapes = [tuple(a.shape) for a in odd[0].arrays]
        raise RunnerError(f"{path}: layer {odd[0].name!r} has weights of shapes "
                          f"{shapes}; only Conv2D and Dense layers can be imported")
    convs = [layer for layer in layers if layer.kind == "Conv2D"]
    dense = [layer for layer in layers if layer.kind == "Dense"]
    targets = _targets(spec)
    _check_counts(path, spec, convs, dense, targets)
    pairs = list(zip(convs + dense, targets[0] + targets[1]))
    for k, (layer, (name, want)) in enumerate(pairs):
        _check_layer(path, spec, layer, name, want, first_dense=k == len(convs))
    state, mapping = {}, {}
    for k, (layer, (name, want)) in enumerate(pairs):
        if layer.kind == "Conv2D":
            weight = _conv(layer)
        else:
            first_dense = k == len(convs)
            weight = _dense(layer, feature_shape(spec) if first_dense else None)
        state[f"{name}.weight"] = weight
        state[f"{name}.bias"] = _bias(layer, want[-1])
        mapping[name] = layer.name
    check_compatible(spec, state)
    return state, mapping


# --- the whole import ---------------------------------------------------------------


def parse_classes(text: str | None, spec: ModelSpec) -> list[str]:
    """``--classes a,b`` (default cats, dogs): one name per class, distinct."""
    names = list(DEFAULT_CLASSES) if text is None else \
        [n.strip() for n in text.split(",")]
    count = max(2, spec.num_outputs)
    if len(names) != count or not all(names) or len(set(names)) != len(names):
        raise RunnerError(f"--classes {text!r}: spec {spec.name} needs {count} "
                          "distinct, non-empty names, comma-separated")
    return names


def import_keras(path, spec: ModelSpec, classes: list[str] | None = None,
                 base_size: int = DEFAULT_BASE_SIZE) -> tuple[dict, dict]:
    """(state dict, meta) for a checkpoint of ``spec`` holding the file's weights.

    ``meta`` records the source file and its sha256, the layout, which Keras
    layer filled which torch layer, the classes and the stored pixel size that
    ``runner predict`` and ``evaluate`` read.
    """
    layout, layers = read_keras_weights(path)
    state, mapping = to_state_dict(spec, layers, path)
    meta = {
        "epoch": 0,
        "classes": list(classes or DEFAULT_CLASSES),
        "base_size": base_size,
        "source": {"keras_file": os.path.abspath(path), "sha256": _sha256(path),
                   "layout": layout, "layers": mapping},
    }
    return state, meta
