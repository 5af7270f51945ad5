"""ModelSpec and build_model: sizes, names, shapes, JSON, channels_last."""

import json

import pytest
import torch

from runner.errors import RunnerError
from runner.model import (
    SPECS,
    ConvBlock,
    ConvLayer,
    ModelSpec,
    build_model,
    classifier_1,
    classifier_2,
    feature_shape,
    flops_per_image,
    get_spec,
    num_params,
    state_shapes,
    train_flops_per_image,
)


def bn_spec():
    blocks = (
        ConvBlock((ConvLayer(8), ConvLayer(12, kernel=5)), pool="avg", batchnorm=True),
        ConvBlock((ConvLayer(16, kernel=1),), pool="none"),
        ConvBlock((ConvLayer(6),), pool="max", pool_size=3),
    )
    return ModelSpec("bn", input_size=32, blocks=blocks, dense=(20, 10),
                     dropout=0.25, num_outputs=3)


@pytest.mark.parametrize("spec, expected", [(classifier_1(), 4_195_457),
                                            (classifier_2(), 1_058_977)])
def test_param_counts_match_the_keras_models(spec, expected):
    model = build_model(spec)
    assert num_params(spec) == expected
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize("spec", [classifier_1(), classifier_2(), bn_spec()])
def test_state_dict_names_and_shapes_are_the_analytic_ones(spec):
    sd = build_model(spec).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == state_shapes(spec)


def test_stable_names():
    names = set(build_model(bn_spec()).state_dict())
    assert {"blocks.0.convs.1.weight", "blocks.0.bns.1.running_var",
            "blocks.1.convs.0.bias", "head.1.weight", "out.bias"} <= names
    assert "blocks.0.convs.0.bias" not in names  # BN makes the conv bias redundant


@pytest.mark.parametrize("spec", [classifier_1(), classifier_2(), bn_spec()])
def test_forward_shapes(spec, real_images):
    images, _ = real_images
    x = torch.nn.functional.interpolate(images, size=spec.input_size, mode="area")
    logits = build_model(spec).eval()(x)
    assert logits.shape == (len(images), spec.num_outputs)
    assert torch.isfinite(logits).all()


def test_feature_shape_and_flops():
    assert feature_shape(classifier_1()) == (32, 32, 32)
    assert feature_shape(classifier_2()) == (32, 16, 16)
    assert feature_shape(bn_spec()) == (6, 5, 5)
    conv = 2 * 3 * 9 * 32 * 64 * 64
    dense = 2 * 32 * 32 * 32 * 128 + 2 * 128
    assert flops_per_image(classifier_1()) == conv + dense
    assert train_flops_per_image(classifier_1()) == 3 * (conv + dense)


@pytest.mark.parametrize("spec", [classifier_1(), bn_spec()])
def test_json_round_trip(spec):
    text = json.dumps(spec.to_dict())
    assert ModelSpec.from_dict(json.loads(text)) == spec


def test_channels_last_forward_matches(real_images):
    images, _ = real_images
    spec = bn_spec()
    x = torch.nn.functional.interpolate(images, size=32, mode="area")
    model = build_model(spec).eval()
    expected = model(x)
    model = model.to(memory_format=torch.channels_last)
    got = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_from_dict_names_unknown_and_invalid_fields():
    d = classifier_1().to_dict()
    with pytest.raises(RunnerError, match="widht"):
        ModelSpec.from_dict({**d, "widht": 3})
    d["blocks"][0]["convs"][0]["filters"] = "many"
    with pytest.raises(RunnerError, match="filters"):
        ModelSpec.from_dict(d)
    d = classifier_1().to_dict()
    d["blocks"][0]["pool"] = "median"
    with pytest.raises(RunnerError, match="pool must be one of max, avg, none"):
        ModelSpec.from_dict(d)
    with pytest.raises(RunnerError, match="field 'blocks' must be a list, got 3"):
        ModelSpec.from_dict({"name": "x", "blocks": 3})


@pytest.mark.parametrize("kwargs, match", [
    ({"input_size": 0}, "input_size"),
    ({"dropout": 1.5}, "dropout"),
    ({"dense": (0,)}, r"dense\[0\]"),
    ({"input_size": 3}, "pools the image to nothing"),
])
def test_validation(kwargs, match):
    with pytest.raises(RunnerError, match=match):
        ModelSpec(**{**classifier_2().to_dict(), "blocks": classifier_2().blocks,
                     **kwargs})


def test_even_kernels_are_refused():
    with pytest.raises(RunnerError, match="odd"):
        ConvLayer(8, kernel=2)


def test_get_spec(tmp_path):
    assert get_spec("classifier_2") == SPECS["classifier_2"]
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(bn_spec().to_dict()))
    assert get_spec(path) == bn_spec()
    with pytest.raises(RunnerError, match="classifier_1, classifier_2"):
        get_spec("classifier_9")
    path.write_text("{not json")
    with pytest.raises(RunnerError, match="mine.json"):
        get_spec(path)


def _textbook_block(block, x):
    """conv (+ bn) -> ReLU for every conv, then the pool: the order the specs
    describe, with nothing moved or done in place."""
    for j, conv in enumerate(block.convs):
        x = conv(x)
        if block.bns is not None:
            x = block.bns[j](x)
        x = torch.relu(x)
    return block.pool(x)


@pytest.mark.parametrize("batchnorm", [False, True])
@pytest.mark.parametrize("pool", ["max", "avg", "none"])
def test_block_matches_relu_then_pool_in_values_and_gradients(pool, batchnorm):
    torch.manual_seed(0)
    spec = ModelSpec("b", input_size=16, blocks=(ConvBlock(
        (ConvLayer(5), ConvLayer(7)), pool=pool, batchnorm=batchnorm),))
    block = build_model(spec).blocks[0].train()
    x = torch.randn(4, 3, 16, 16)
    grads = []
    for forward in (block, lambda t: _textbook_block(block, t)):
        block.zero_grad()
        xi = x.clone().requires_grad_()
        out = forward(xi)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append((out.detach(), xi.grad,
                      [p.grad.clone() for p in block.parameters()]))
    (out, gx, gp), (ref, ref_gx, ref_gp) = grads
    assert torch.equal(out, ref)
    torch.testing.assert_close(gx, ref_gx, rtol=0, atol=1e-6)
    for got, want in zip(gp, ref_gp):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
