"""runner import-keras on Keras models of the spec architectures, saved by Keras
3 itself (``save_weights`` .weights.h5 and the legacy ``model.save`` .h5) and
in the Keras 2 ``save_weights`` layout; the imported checkpoint must compute
the Keras model's function on real images. No training, no Ray."""

import hashlib
import json
import os

os.environ["KERAS_BACKEND"] = "torch"  # before keras is first imported

import h5py
import numpy as np
import pytest
import torch

from runner.cli import main
from runner.model import build_model, load_checkpoint
from runner.model.growth import apply_op
from runner.model.spec import (
    ConvBlock,
    ConvLayer,
    ModelSpec,
    classifier_1,
    classifier_2,
)

# eleven convs: Keras 3 names them conv2d, conv2d_1 .. conv2d_10, which HDF5
# lists alphabetically (conv2d_10 before conv2d_2); the import must reorder
DEEP = ModelSpec(name="deep_11", blocks=(
    ConvBlock(convs=(ConvLayer(4),) * 11, pool="max"),), dense=(8,), dropout=0.5)
SPECS = {"classifier_1": classifier_1(), "classifier_2": classifier_2(),
         "deep_11": DEEP}
LAYOUTS = ("keras3.weights.h5", "legacy.h5", "keras2.h5")
# Keras's torch backend converts tensors in a way numpy 2 warns about
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")


@pytest.fixture(scope="module")
def keras():
    import keras

    assert keras.backend.backend() == "torch"
    return keras


def keras_model(keras, spec: ModelSpec, seed: int = 0):
    """The spec's architecture in Keras, as the original wrote it: Conv2D+ReLU
    ('same'), MaxPooling, Flatten, Dense+ReLU (+Dropout), Dense(1, sigmoid)."""
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    stack = [keras.Input((spec.input_size, spec.input_size, spec.in_channels))]
    for block in spec.blocks:
        stack += [layers.Conv2D(c.filters, c.kernel, padding="same",
                                activation="relu") for c in block.convs]
        stack.append(layers.MaxPooling2D(block.pool_size))
    stack.append(layers.Flatten())
    for units in spec.dense:
        stack.append(layers.Dense(units, activation="relu"))
        if spec.dropout:
            stack.append(layers.Dropout(spec.dropout))
    stack.append(layers.Dense(1, activation="sigmoid"))
    model = keras.Sequential(stack)
    # Keras starts biases at zero; random ones show each lands in its place
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if getattr(layer, "bias", None) is not None:
            layer.bias.assign(rng.normal(0, 0.1, layer.bias.shape).astype("float32"))
    return model


def keras_outputs(keras, model, nchw: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, logits) of the Keras model; the logits come from the same
    model with the output layer's sigmoid switched off."""
    x = nchw.permute(0, 2, 3, 1).numpy()  # Keras is NHWC
    probs = keras.ops.convert_to_numpy(model(x, training=False))
    sigmoid, model.layers[-1].activation = (model.layers[-1].activation,
                                            keras.activations.linear)
    try:
        logits = keras.ops.convert_to_numpy(model(x, training=False))
    finally:
        model.layers[-1].activation = sigmoid
    return probs[:, 0], logits[:, 0]


def keras2_layout(legacy: str, out: str) -> None:
    """Rewrite a legacy full-model .h5 into tf.keras 2's save_weights layout:
    layer groups at the root, ``<layer>/<layer>/kernel:0``, names as bytes."""
    with h5py.File(legacy, "r") as src, h5py.File(out, "w") as dst:
        weights = src["model_weights"]
        names = [n.decode() if isinstance(n, bytes) else n
                 for n in weights.attrs["layer_names"]]
        dst.attrs["layer_names"] = np.array([n.encode() for n in names])
        dst.attrs["keras_version"] = b"2.15.0"
        for name in names:
            group = dst.create_group(name)
            saved = [w.decode() if isinstance(w, bytes) else w
                     for w in weights[name].attrs["weight_names"]]
            renamed = []
            for w in saved:
                short = f"{name}/{w.rsplit('/', 1)[1]}:0"
                group[short] = weights[name][w][()]
                renamed.append(short.encode())
            group.attrs["weight_names"] = np.array(renamed, dtype="S")


@pytest.fixture(scope="module")
def saved(keras, real_images, tmp_path_factory):
    """Per spec: the Keras model, its outputs on the real images, and its
    weights in each layout (and its spec as a JSON file)."""
    images = real_images[0]
    out = {}
    for name, spec in SPECS.items():
        folder = tmp_path_factory.mktemp(name)
        model = keras_model(keras, spec)
        model.save_weights(str(folder / "keras3.weights.h5"))
        model.save(str(folder / "legacy.h5"))  # Keras 3 writes the legacy layout
        keras2_layout(str(folder / "legacy.h5"), str(folder / "keras2.h5"))
        (folder / "spec.json").write_text(json.dumps(spec.to_dict()))
        probs, logits = keras_outputs(keras, model, images)
        out[name] = {"model": model, "folder": folder, "probs": probs,
                     "logits": logits}
    return out


def run_cli(capsys, *argv):
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def import_file(capsys, path, spec_arg, out, *extra):
    status, stdout, err = run_cli(capsys, "import-keras", path, "--spec", spec_arg,
                                  "--out", out, *extra)
    assert status == 0, err
    return stdout


def torch_logits(spec, state, images) -> np.ndarray:
    model = build_model(spec)
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        return model(images)[:, 0].numpy()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", list(SPECS))
def test_imported_checkpoint_computes_the_keras_model(
        saved, real_images, tmp_path, capsys, name, layout):
    ref = saved[name]
    spec_arg = name if name in ("classifier_1", "classifier_2") \
        else ref["folder"] / "spec.json"
    weights = ref["folder"] / layout
    stdout = import_file(capsys, weights, spec_arg, tmp_path / "ckpt")
    assert "wrote" in stdout

    spec, state, meta = load_checkpoint(tmp_path / "ckpt")
    assert spec == SPECS[name]
    logits = torch_logits(spec, state, real_images[0])
    # the outputs differ from image to image, so agreeing is not a coincidence
    assert np.ptp(ref["logits"]) > 1e-2
    np.testing.assert_allclose(logits, ref["logits"], atol=1e-4, rtol=0)
    probs = torch.sigmoid(torch.from_numpy(logits)).numpy()
    np.testing.assert_allclose(probs, ref["probs"], atol=1e-4, rtol=0)

    assert meta["classes"] == ["cats", "dogs"] and meta["base_size"] == 72
    source = meta["source"]
    assert source["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert source["keras_file"] == str(weights.resolve())
    assert source["layout"].startswith("keras3" if "keras3" in layout else "keras hdf5")
    conv_names = [source["layers"][f"blocks.0.convs.{j}"]
                  for j in range(len(spec.blocks[0].convs))]
    assert len(set(conv_names)) == len(conv_names)


def test_imported_checkpoint_grows_and_predicts(
        keras, saved, real_images, cats_dogs_subset, tmp_path, capsys):
    """The growth ops take the import as a parent, and `runner predict` gives the
    Keras model's probability for a real JPEG."""
    ref = saved["classifier_1"]
    import_file(capsys, ref["folder"] / "keras3.weights.h5", "classifier_1",
                tmp_path / "ckpt", "--classes", "cat,dog")
    spec, state, _ = load_checkpoint(tmp_path / "ckpt")

    child, child_state, report = apply_op(spec, state, "widen_dense", index=0,
                                          units=256, rng=0)
    assert report.exact and child.dense == (256,)
    np.testing.assert_allclose(torch_logits(child, child_state, real_images[0]),
                               ref["logits"], atol=1e-4, rtol=0)

    from runner.data.ingest import decode_image
    from runner.data.pipeline import eval_view
    jpeg = min((cats_dogs_subset / "test_set" / "dogs").glob("*.jpg"))
    decoded = decode_image(str(jpeg), 72)
    pixels = np.frombuffer(bytearray(decoded.image), np.uint8).reshape(1, 72, 72, 3)
    p_dog = float(keras_outputs(keras, ref["model"], eval_view(pixels, 64))[0][0])
    status, out, err = run_cli(capsys, "predict", tmp_path / "ckpt", jpeg)
    assert status == 0, err
    _, label, prob = out.strip().split("\t")
    assert label == ("dog" if p_dog > 0.5 else "cat")
    assert abs(float(prob) - max(p_dog, 1 - p_dog)) <= 1e-4


def one_line_error(capsys, *argv) -> str:
    status, _, err = run_cli(capsys, *argv)
    assert status == 2
    assert err.startswith("runner: error: ") and err.count("\n") == 1, err
    return err


def test_other_architecture_is_refused_naming_file_and_layers(saved, tmp_path,
                                                              capsys):
    weights = saved["classifier_1"]["folder"] / "keras3.weights.h5"
    err = one_line_error(capsys, "import-keras", weights, "--spec", "classifier_2",
                         "--out", tmp_path / "out")
    assert str(weights) in err and "classifier_2" in err
    assert "1 Conv2D layer(s) (conv2d)" in err
    assert not (tmp_path / "out").exists()


def test_shape_mismatch_names_file_layer_and_both_shapes(saved, tmp_path, capsys):
    narrow = ModelSpec(name="narrow", blocks=classifier_1().blocks, dense=(64,))
    (tmp_path / "narrow.json").write_text(json.dumps(narrow.to_dict()))
    weights = saved["classifier_1"]["folder"] / "legacy.h5"
    err = one_line_error(capsys, "import-keras", weights, "--spec",
                         tmp_path / "narrow.json", "--out", tmp_path / "out")
    assert str(weights) in err and "'dense'" in err and "head.0" in err
    assert "(32768, 128)" in err and "(32768, 64)" in err


def test_bad_files_get_one_line(cats_dogs_subset, tmp_path, capsys):
    jpeg = min((cats_dogs_subset / "training_set" / "cats").glob("*.jpg"))
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = np.zeros(3)
    cases = {jpeg: "not an HDF5 file", tmp_path / "missing.h5": "no such file",
             tmp_path: "is a folder", plain: "not Keras weights"}
    for path, message in cases.items():
        err = one_line_error(capsys, "import-keras", path, "--spec", "classifier_1",
                             "--out", tmp_path / "out")
        assert str(path) in err and message in err, err
    assert not (tmp_path / "out").exists()


def test_bad_settings_get_one_line(saved, tmp_path, capsys):
    weights = saved["classifier_1"]["folder"] / "keras3.weights.h5"
    err = one_line_error(capsys, "import-keras", weights, "--spec", "classifier_9",
                         "--out", tmp_path / "a")
    assert "unknown model spec 'classifier_9'" in err
    err = one_line_error(capsys, "import-keras", weights, "--spec", "classifier_1",
                         "--out", tmp_path / "a", "--classes", "cats")
    assert "--classes" in err
    import_file(capsys, weights, "classifier_1", tmp_path / "b")
    err = one_line_error(capsys, "import-keras", weights, "--spec", "classifier_1",
                         "--out", tmp_path / "b")
    assert "already holds a checkpoint" in err


def test_an_existing_file_as_out_is_refused_and_kept(saved, tmp_path, capsys):
    weights = saved["classifier_1"]["folder"] / "keras3.weights.h5"
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    for out in (notes, notes / "imported"):  # the file itself, or in the way
        err = one_line_error(capsys, "import-keras", weights, "--spec",
                             "classifier_1", "--out", out)
        assert f"--out {out}: " in err and "is a file, not a folder" in err
    assert notes.read_text() == "keep me"
