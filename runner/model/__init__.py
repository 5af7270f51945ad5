"""Models: specs and the torch module, growth ops, safe checkpoints."""

from runner.model.checkpoint import load_checkpoint, normalise_keys, save_checkpoint
from runner.model.growth import (
    OPS,
    TRANSFER_KINDS,
    TransferReport,
    apply_op,
    check_compatible,
    deepen_block,
    deepen_conv,
    fresh,
    measure_drift,
    plain_copy,
    transfer_to,
    widen_conv,
    widen_dense,
)
from runner.model.spec import (
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

__all__ = [
    "OPS", "SPECS", "TRANSFER_KINDS", "ConvBlock", "ConvLayer", "ModelSpec",
    "TransferReport", "apply_op", "build_model", "check_compatible",
    "classifier_1", "classifier_2", "deepen_block", "deepen_conv",
    "feature_shape", "flops_per_image", "fresh", "get_spec", "load_checkpoint",
    "measure_drift", "normalise_keys", "num_params", "plain_copy",
    "save_checkpoint", "state_shapes", "train_flops_per_image", "transfer_to",
    "widen_conv", "widen_dense",
]
