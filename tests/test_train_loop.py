"""Pieces of the training loop that need no cluster."""

import math

import pytest
import torch

from runner.config import load_job
from runner.errors import RunnerError
from runner.model import build_model, get_spec
from runner.train import precision
from runner.train.loop import LR_FLOOR, _Stream, _train_epoch, lr_at, over_budget


def test_a_constant_schedule_keeps_the_rate():
    assert [lr_at(e, 5, 1e-3, "constant") for e in range(5)] == [1e-3] * 5


def test_a_cosine_schedule_anneals_from_the_rate_to_its_floor():
    rates = [lr_at(e, 5, 1e-3, "cosine") for e in range(5)]
    assert rates[0] == pytest.approx(1e-3)
    assert rates[-1] == pytest.approx(LR_FLOOR * 1e-3)
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert lr_at(0, 1, 1e-3, "cosine") == 1e-3  # one epoch: nothing to anneal


def test_an_unknown_schedule_is_refused_by_name():
    with pytest.raises(RunnerError, match="train.lr_schedule must be one of"):
        load_job("jobs/cats_dogs.yaml", ["train.lr_schedule=step"])


def test_a_budget_stops_once_any_capped_counter_reaches_its_cap():
    spent = {"flops": 2e12, "cpu_s": 100.0, "wall_s": 50.0}
    assert not over_budget(spent, {})
    assert not over_budget(spent, {"flops": 3e12})
    assert over_budget(spent, {"flops": 3e12, "wall_s": 50.0})


def test_an_unknown_precision_is_refused_by_name():
    with pytest.raises(RunnerError, match="train.precision must be one of auto, bf16, fp32"):
        load_job("jobs/cats_dogs.yaml", ["train.precision=fp16"])


def test_auto_precision_follows_the_cpu():
    native, _ = precision.native_bf16()
    assert precision.resolve("auto") == ("bf16" if native else "fp32")
    assert precision.resolve("fp32") == "fp32" and precision.resolve("bf16") == "bf16"
    assert precision.describe("auto").startswith(precision.resolve("auto"))


def _steps(arithmetic: str):
    """Two steps of classifier_1 at ``arithmetic`` on a fixed random batch:
    the dtype its first convolution computed in, the weights before and after,
    and the loss the epoch counted."""
    torch.manual_seed(0)
    model = build_model(get_spec("classifier_1")).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    seen = []
    conv.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    batch = {"image": torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8),
             "label": torch.tensor([0, 1] * 4, dtype=torch.float32)}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    counts = _train_epoch(model, optimizer, _Stream(iter([batch, batch])), 16, [],
                          arithmetic)
    return seen, before, model.state_dict(), counts


@pytest.mark.parametrize("arithmetic,dtype", [("bf16", torch.bfloat16),
                                              ("fp32", torch.float32)])
def test_a_step_computes_in_its_precision_and_keeps_fp32_weights(arithmetic, dtype):
    seen, before, after, counts = _steps(arithmetic)
    assert seen == [dtype, dtype]
    assert all(v.dtype == before[k].dtype for k, v in after.items())
    assert after["blocks.0.convs.0.weight"].dtype == torch.float32
    assert not torch.equal(before["blocks.0.convs.0.weight"],
                           after["blocks.0.convs.0.weight"])
    assert counts["seen"] == 16 and math.isfinite(counts["loss_sum"])


def test_bf16_trains_like_fp32():
    """The same two steps in bf16 and fp32 move the weights the same way and
    see nearly the same loss: autocast changes the rounding of the products,
    not what is learned."""
    _, start, fp32, fp32_counts = _steps("fp32")
    _, _, bf16, bf16_counts = _steps("bf16")

    def update(after):
        return torch.cat([(after[k] - start[k]).flatten() for k in start
                          if start[k].is_floating_point()])

    assert not torch.equal(update(fp32), update(bf16))  # bf16 did round
    assert torch.cosine_similarity(update(fp32), update(bf16), dim=0) > 0.95
    assert bf16_counts["loss_sum"] == pytest.approx(fp32_counts["loss_sum"], rel=0.05)
