"""The arithmetic a training step runs in: ``train.precision``.

``bf16`` runs the forward pass under torch's CPU autocast (the backward
pass follows the dtypes the forward chose): convolutions and matrix
multiplies take bfloat16 inputs and accumulate in float32, while the
weights, their gradients, the optimizer state, batch-norm statistics and
the loss stay float32. No loss scaling is needed (bfloat16
has float32's exponent range). On a CPU with native bfloat16 dot products
(AVX512-BF16 or AMX) a step of these networks is about twice as fast as in
float32; on one without, bfloat16 is emulated and slower than float32.

``auto`` (the default) therefore picks bf16 where the worker's own CPU has
native support and fp32 elsewhere, so each worker of a mixed cluster runs
what is fast on its machine. Validation, test, export and prediction always
run in float32: the weights are float32 either way.
"""

from __future__ import annotations

import contextlib

import torch


def native_bf16() -> tuple[bool, str]:
    """Whether this CPU has native bfloat16 arithmetic, and which feature
    says so. torch exposes the check only under private names; a torch
    without them is taken as having none (fp32, always correct)."""
    for feature, probe in (("AMX", "_is_amx_tile_supported"),
                           ("AVX512-BF16", "_is_avx512_bf16_supported")):
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            return True, feature
    return False, "no AVX512-BF16 or AMX"


def resolve(precision: str) -> str:
    """``auto`` -> what suits this CPU; ``bf16`` and ``fp32`` as given."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16()[0] else "fp32"


def describe(precision: str) -> str:
    """One line for logs and ``runner doctor``: what ``precision`` means here."""
    native, feature = native_bf16()
    used = resolve(precision)
    how = "auto, " if precision == "auto" else ""
    if used == "bf16" and not native:
        return f"bf16 ({how}this CPU has {feature}: emulated, slower than fp32)"
    return f"{used} ({how}this CPU has {feature})"


def autocast(precision: str):
    """Context for a training step's forward pass at resolved ``precision``."""
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()
