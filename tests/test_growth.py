"""Growth ops: function preserved, gradients flow, reports say what moved."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

from runner.errors import RunnerError
from runner.model import (
    ConvBlock,
    ConvLayer,
    ModelSpec,
    apply_op,
    build_model,
    check_compatible,
    classifier_1,
    classifier_2,
    deepen_block,
    deepen_conv,
    fresh,
    measure_drift,
    num_params,
    plain_copy,
    transfer_to,
    widen_conv,
    widen_dense,
)
from runner.model.growth import _fold_pooled


def parent_weights(spec, seed=0):
    """build_model's init at He scale, with non-trivial BatchNorm statistics.

    The default init shrinks activations block by block; at He scale the
    logits are O(1), so a 1e-5 tolerance means something.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sd = build_model(spec).state_dict()
    for name, t in sd.items():
        if name.endswith("weight") and t.dim() > 1:
            t.mul_(math.sqrt(6))
        elif ".bns." in name and name.endswith(("weight", "running_var")):
            t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
        elif ".bns." in name and name.endswith(("bias", "running_mean")):
            t.copy_(0.1 * torch.randn(t.shape, generator=gen))
    return sd


def at_size(images, spec):
    return F.interpolate(images, size=spec.input_size, mode="area")


def assert_same_function(parent, psd, child, csd, images, labels):
    report = measure_drift(parent, psd, child, csd, at_size(images, parent), labels)
    assert report.max_abs_logit_diff <= 1e-5
    assert report.acc_parent == report.acc_child


def assert_every_param_learns(spec, sd, images, labels):
    """One backward in train mode: every parameter gets a finite gradient."""
    model = build_model(spec)
    model.load_state_dict(sd)
    logits = model.train()(at_size(images, spec))
    if spec.num_outputs == 1:
        loss = F.binary_cross_entropy_with_logits(logits[:, 0], labels.float())
    else:
        loss = F.cross_entropy(logits, labels)
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name


# --- property tests over random small specs and ops ----------------------------


@st.composite
def small_specs(draw):
    blocks = []
    for _ in range(draw(st.integers(1, 3))):
        convs = [ConvLayer(draw(st.integers(4, 16)), draw(st.sampled_from([1, 3, 5])))
                 for _ in range(draw(st.integers(1, 2)))]
        pool = draw(st.sampled_from(["max", "avg"]))
        blocks.append(ConvBlock(tuple(convs), pool, batchnorm=draw(st.booleans())))
    dense = draw(st.lists(st.integers(8, 64), min_size=1, max_size=2))
    return ModelSpec("parent", input_size=draw(st.sampled_from([32, 64])),
                     blocks=tuple(blocks), dense=tuple(dense),
                     dropout=draw(st.sampled_from([0.0, 0.3])),
                     num_outputs=draw(st.sampled_from([1, 2])))


def draw_op(data, spec):
    """A random function-preserving op with valid parameters for ``spec``."""
    name = data.draw(st.sampled_from(["widen_conv", "widen_dense", "deepen_conv"]))
    block = data.draw(st.integers(0, len(spec.blocks) - 1))
    layer = data.draw(st.integers(0, len(spec.blocks[block].convs) - 1))
    more = data.draw(st.integers(1, 8))
    if name == "widen_conv":
        filters = spec.blocks[block].convs[layer].filters + more
        return name, {"block": block, "layer": layer, "filters": filters}
    if name == "widen_dense":
        index = data.draw(st.integers(0, len(spec.dense) - 1))
        return name, {"index": index, "units": spec.dense[index] + more}
    kernel = data.draw(st.sampled_from([1, 3]))
    return name, {"block": block, "after_layer": layer, "kernel": kernel}


@settings(max_examples=25, deadline=None)
@given(spec=small_specs(), seed=st.integers(0, 1000), data=st.data())
def test_function_preserving_ops_keep_logits(real_images, spec, seed, data):
    images, labels = real_images
    psd = parent_weights(spec, seed)
    child, csd = spec, psd
    for _ in range(data.draw(st.integers(1, 3))):
        name, params = draw_op(data, child)
        child, csd, report = apply_op(child, csd, name, rng=seed, **params)
        assert report.exact and report.noise == 0.0
        assert sum(report.counts().values()) == num_params(child)
    check_compatible(child, csd)
    assert_same_function(spec, psd, child, csd, images, labels)
    assert_every_param_learns(child, csd, images, labels)

    # the planner finds an equivalent route to the same child
    target = ModelSpec.from_dict({**child.to_dict(), "name": "target"})
    again, asd, report = transfer_to(spec, psd, target, rng=seed)
    assert again == target and report.exact
    assert_same_function(spec, psd, again, asd, images, labels)


# --- single ops on the reference networks ---------------------------------------


def test_widen_conv_into_the_flatten(real_images):
    images, labels = real_images
    spec, sd = classifier_1(), parent_weights(classifier_1())
    child, csd, report = widen_conv(spec, sd, 0, 0, 40, rng=1)
    assert child.blocks[0].convs[0].filters == 40
    assert csd["head.0.weight"].shape == (128, 40 * 32 * 32)
    assert_same_function(spec, sd, child, csd, images, labels)
    assert report.parent == "classifier_1" and report.exact
    # the parent's tensors are untouched
    assert sd["head.0.weight"].shape == (128, 32 * 32 * 32)


def test_noise_breaks_symmetry_but_is_reported(real_images):
    images, labels = real_images
    spec = ModelSpec("s", input_size=32, blocks=(ConvBlock((ConvLayer(8),)),),
                     dense=(16,))
    sd = parent_weights(spec)
    child, csd, report = widen_dense(spec, sd, 0, 24, noise=0.1, rng=3)
    assert report.noise == 0.1 and not report.exact
    drift = measure_drift(spec, sd, child, csd, at_size(images, spec), labels)
    assert 0 < drift.max_abs_logit_diff < 1.0


def test_deepen_conv_with_batchnorm_is_identity_in_eval(real_images):
    images, labels = real_images
    block = ConvBlock((ConvLayer(8), ConvLayer(6)), pool="avg", batchnorm=True)
    spec = ModelSpec("bn", input_size=32, blocks=(block,), dense=(16,))
    sd = parent_weights(spec)
    child, csd, report = deepen_conv(spec, sd, 0, 0)
    assert [c.filters for c in child.blocks[0].convs] == [8, 8, 6]
    moved = {t["name"]: t["source"] for t in report.tensors}
    assert moved["blocks.0.bns.2.running_var"] == "blocks.0.bns.1.running_var"
    assert "eval mode" in "".join(t["note"] for t in report.tensors)
    assert_same_function(spec, sd, child, csd, images, labels)


def test_deepen_block_on_classifier_1(real_images):
    images, labels = real_images
    spec, sd = classifier_1(), parent_weights(classifier_1())
    child, csd, report = deepen_block(spec, sd)
    assert ModelSpec.from_dict({**child.to_dict(), "name": "classifier_2"}) == \
        classifier_2()
    entries = {t["name"]: t for t in report.tensors}
    head = entries.pop("head.0.weight")
    assert head["status"] == "morphed" and not head["exact"]
    assert head["shape"] == [128, 8192]
    assert all(t["exact"] for t in entries.values())
    report = measure_drift(spec, sd, child, csd, at_size(images, spec), labels,
                           report=report)
    assert math.isfinite(report.max_abs_logit_diff)
    assert "approx" in report.format() and "drift" in report.format()
    assert report.to_dict()["counts"]["fresh"] == 0
    assert_every_param_learns(child, csd, images, labels)


def test_deepen_block_wider_and_odd_sizes():
    block = ConvBlock((ConvLayer(4),), pool="max", pool_size=3)  # 32 -> 10
    spec = ModelSpec("odd", input_size=32, blocks=(block,), dense=(8,))
    child, csd, report = deepen_block(spec, parent_weights(spec), filters=6,
                                      pool="avg", batchnorm=True)
    assert child.blocks[1] == ConvBlock((ConvLayer(6),), "avg", 2, True)
    check_compatible(child, csd)
    head = next(t for t in report.tensors if t["name"] == "head.0.weight")
    assert "10x10 -> 5x5" in head["note"]
    spec = ModelSpec("odd", input_size=27, blocks=(block,), dense=(8,))  # 9 -> 4
    _, _, report = deepen_block(spec, parent_weights(spec))
    head = next(t for t in report.tensors if t["name"] == "head.0.weight")
    assert "drops the last 1 row(s) and 1 col(s)" in head["note"]


def test_fold_pooled_is_exact_for_window_constant_features():
    torch.manual_seed(0)
    w = torch.randn(5, 3 * 6 * 6)
    coarse = torch.rand(1, 3, 3, 3)
    fine = coarse.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    folded, _ = _fold_pooled(w, (3, 6, 6), 2)
    pooled = F.max_pool2d(fine, 2)
    torch.testing.assert_close(folded @ pooled.flatten(1).T, w @ fine.flatten(1).T)


def test_plain_copy_classifier_1_to_2_copies_only_the_first_conv():
    spec, sd = classifier_1(), parent_weights(classifier_1())
    child, csd, report = plain_copy(spec, sd, classifier_2(), rng=0)
    counts = report.counts()
    assert counts == {"copied": 896, "morphed": 0, "fresh": 1_058_977 - 896}
    copied = [t["name"] for t in report.tensors if t["status"] == "copied"]
    assert copied == ["blocks.0.convs.0.weight", "blocks.0.convs.0.bias"]
    assert torch.equal(csd["blocks.0.convs.0.weight"], sd["blocks.0.convs.0.weight"])
    check_compatible(child, csd)


def test_plain_copy_same_spec_copies_everything():
    spec, sd = classifier_2(), parent_weights(classifier_2())
    _, csd, report = plain_copy(spec, sd, spec)
    assert report.counts()["copied"] == 1_058_977
    assert all(torch.equal(csd[k], sd[k]) for k in sd)


def test_fresh_is_seeded():
    _, a, report = fresh(classifier_2(), seed=4)
    _, b, _ = fresh(classifier_2(), seed=4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert report.counts()["fresh"] == 1_058_977 and report.parent is None


# --- planning a route to a target spec -------------------------------------------


def test_transfer_to_classifier_2_is_deepen_block():
    spec, sd = classifier_1(), parent_weights(classifier_1())
    child, csd, report = transfer_to(spec, sd, classifier_2())
    assert child == classifier_2() and report.op == "deepen_block"
    approx = [t["name"] for t in report.tensors if not t["exact"]]
    assert approx == ["head.0.weight"]
    check_compatible(child, csd)


def test_transfer_to_a_mixed_target(real_images):
    images, labels = real_images
    spec = ModelSpec("p", input_size=32, blocks=(ConvBlock((ConvLayer(8),)),),
                     dense=(16,))
    sd = parent_weights(spec)
    wide = ConvBlock((ConvLayer(12), ConvLayer(10, kernel=1)))
    target = ModelSpec("t", input_size=32, blocks=(wide,), dense=(24,), dropout=0.2)
    child, csd, report = transfer_to(spec, sd, target, rng=0)
    assert child == target and report.exact
    assert report.op == "deepen_conv+widen_conv+widen_conv+widen_dense"
    assert_same_function(spec, sd, child, csd, images, labels)

    extra = ConvBlock((ConvLayer(16), ConvLayer(16)), pool="avg")
    target = ModelSpec("t2", input_size=32, blocks=(wide, extra), dense=(24,))
    child, csd, report = transfer_to(spec, sd, target, rng=0)
    assert child == target
    assert [t["name"] for t in report.tensors if not t["exact"]] == ["head.0.weight"]
    assert_every_param_learns(child, csd, images, labels)


def test_incompatible_transfer_lists_layers_and_shapes():
    spec, sd = classifier_2(), parent_weights(classifier_2())
    narrow = ModelSpec("narrow", blocks=(ConvBlock((ConvLayer(16),)),), dense=(64,))
    with pytest.raises(RunnerError) as err:
        transfer_to(spec, sd, narrow)
    msg = str(err.value)
    assert "'classifier_2' into 'narrow'" in msg
    assert "2 blocks -> 1" in msg and "head.0 128 -> 64 units" in msg
    assert "block 0 convs [32@3x3] cannot grow into [16@3x3]" in msg
    assert "blocks.0.convs.0.weight (32, 3, 3, 3) vs (16, 3, 3, 3)" in msg
    assert "head.0.weight (128, 8192) vs (64, 16384)" in msg
    assert "\n" not in msg
    # the other kinds always work
    for kind in ("plain_copy", "fresh"):
        child, csd, _ = transfer_to(spec, sd, narrow, kind=kind, rng=0)
        check_compatible(child, csd)
    child, _, _ = transfer_to(spec, sd, "classifier_1", kind="plain_copy")
    assert child == classifier_1()


def test_check_compatible_lists_every_problem():
    spec, sd = classifier_1(), parent_weights(classifier_1())
    sd = dict(sd, extra=torch.zeros(1))
    sd["head.0.weight"] = torch.zeros(128, 10)
    del sd["out.bias"]
    with pytest.raises(RunnerError) as err:
        check_compatible(spec, sd)
    msg = str(err.value)
    assert "missing out.bias (1,)" in msg and "unexpected extra" in msg
    assert "head.0.weight expected (128, 32768) found (128, 10)" in msg


@pytest.mark.parametrize("name, params, match", [
    ("grow_wings", {}, "known: widen_conv, widen_dense, deepen_conv"),
    ("widen_conv", {"block": 0, "layer": 0, "filterz": 3}, "filterz"),
    ("widen_conv", {"block": 0, "layer": 0, "filters": 16}, "filters must be more"),
    ("widen_conv", {"block": 2, "layer": 0, "filters": 64}, "block must be an index"),
    ("widen_dense", {"index": 0, "units": 64}, "units must be more"),
    ("deepen_conv", {"block": 0, "after_layer": 0, "kernel": 2}, "odd"),
    ("deepen_block", {"filters": 8}, "filters must be >="),
    ("deepen_block", {"pool_size": 64}, "pools the image to nothing"),
    ("widen_conv", {"block": 0, "layer": 0, "filters": 64.5},
     "widen_conv filters must be a whole number, got 64.5"),
    ("widen_dense", {"index": 0, "units": True}, "units must be a whole number"),
    ("deepen_conv", {"block": 0, "after_layer": 0, "kernel": 2.5},
     "deepen_conv kernel must be a whole number, got 2.5"),
    ("deepen_block", {"pool_size": 1.5}, "deepen_block pool_size must be a whole number"),
    ("deepen_block", {"kernel": "3"}, "deepen_block kernel must be a whole number"),
    ("deepen_block", {"filters": 64.0}, "deepen_block filters must be a whole number"),
])
def test_apply_op_refuses_clearly(name, params, match):
    spec, sd = classifier_1(), parent_weights(classifier_1())
    with pytest.raises(RunnerError, match=match):
        apply_op(spec, sd, name, **params)


def test_transfer_kind_must_be_known():
    spec, sd = classifier_1(), parent_weights(classifier_1())
    with pytest.raises(RunnerError, match="function_preserving, plain_copy, fresh"):
        transfer_to(spec, sd, classifier_2(), kind="magic")


# --- several ops in one child ----------------------------------------------------


def test_combine_is_the_ops_in_turn_with_one_report(real_images):
    images, labels = real_images
    spec, psd = classifier_1(), parent_weights(classifier_1())
    steps = [{"op": "deepen_conv", "block": 0, "after_layer": 0},
             {"op": "widen_conv", "block": 0, "layer": 1, "filters": 48}]
    child, csd, report = apply_op(spec, psd, "combine", steps=steps, rng=3)
    assert report.op == "deepen_conv+widen_conv" and report.exact
    assert [c.filters for c in child.blocks[0].convs] == [32, 48]
    assert_same_function(spec, psd, child, csd, images, labels)
    # the first conv came through both steps untouched; the new one was built
    by_name = {t["name"]: t for t in report.tensors}
    assert by_name["blocks.0.convs.0.weight"]["status"] == "copied"
    assert by_name["blocks.0.convs.1.weight"]["status"] == "morphed"
    assert sum(report.counts().values()) == num_params(child)


@pytest.mark.parametrize("steps, match", [
    ([], "non-empty list"),
    ([{"op": "plain_copy", "to": "classifier_2"}], "step 1 .* needs op"),
    ([{"op": "deepen_block"}, {"op": "widen_dense", "index": 3, "units": 999}],
     "index"),
])
def test_combine_refuses_clearly(steps, match):
    spec, sd = classifier_1(), parent_weights(classifier_1())
    with pytest.raises(RunnerError, match=match):
        apply_op(spec, sd, "combine", steps=steps)
