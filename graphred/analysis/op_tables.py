"""Tables of aten op packets by how they treat a token axis (identity, reshape, creation,
attention, reduction, convolution, losses, ops that compute nothing), shared by the analyses
and the passes."""
from __future__ import annotations

import torch
import torch.fx as fx

from ..fx_utils import aten_packets, node_shape, op_packet

aten = torch.ops.aten

IDENTITY = aten_packets(
    "clone", "contiguous", "_to_copy", "to", "alias", "detach", "lift_fresh_copy", "type_as",
    "dropout", "softmax", "_softmax", "log_softmax", "_log_softmax", "layer_norm", "rms_norm",
    "_fused_rms_norm", "group_norm", "batch_norm", "_native_batch_norm_legit_no_training",
    "native_layer_norm", "native_dropout", "gelu", "silu", "relu", "tanh", "sigmoid", "masked_fill",
    "fill", "zeros_like", "ones_like", "full_like", "empty_like", "_assert_tensor_metadata",
    "where", "clamp", "hardtanh", "erf", "pow", "rsqrt", "exp", "neg", "cumsum", "tril", "triu",
    "bitwise_not", "logical_not", "abs", "sqrt", "mish", "log", "sin", "cos", "round", "floor",
    "_native_batch_norm_legit_functional", "batch_norm_with_update", "instance_norm",
)
RESHAPES = aten_packets("view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as")
CREATION = aten_packets(
    "arange", "zeros", "ones", "full", "empty", "scalar_tensor", "new_ones", "new_zeros", "new_full",
    "new_empty", "rand", "randn", "randint", "tensor", "linspace", "eye", "empty_strided", "ones_like",
)
SDPA = aten_packets(
    "scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_attention_math",
)
REDUCTIONS = aten_packets("sum", "mean", "amax", "amin", "max", "min", "any", "all", "prod", "var", "std", "argmax", "argmin", "norm", "linalg_vector_norm", "logsumexp")
CONV = aten_packets("conv1d", "conv2d", "conv3d", "convolution", "_convolution")
# (input, target, ...) losses: the target lines up with the input position by position; class-index
# losses (target rank = input rank - 1) skip the input's class dim 1
CLASS_INDEX_LOSSES = aten_packets("cross_entropy_loss", "nll_loss", "nll_loss_forward", "nll_loss_nd", "nll_loss2d",
                              "nll_loss2d_forward", "multi_margin_loss", "multilabel_margin_loss")
LOSSES = CLASS_INDEX_LOSSES | aten_packets(
    "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "binary_cross_entropy", "binary_cross_entropy_with_logits",
    "kl_div", "soft_margin_loss", "poisson_nll_loss", "hinge_embedding_loss")


def loss_target_dims(node: fx.Node) -> dict[int, int]:
    """For a loss node: input dim -> the target dim that lines up with it (the target is ``args[1]``)."""
    xs, ts = node_shape(node.args[0]), node_shape(node.args[1]) if len(node.args) > 1 else None
    if xs is None or ts is None:
        return {}
    if op_packet(node) in CLASS_INDEX_LOSSES and len(ts) == len(xs) - 1:
        return {0: 0, **{d: d - 1 for d in range(2, len(xs))}} if xs else {}
    off = len(xs) - len(ts)  # same shape, or broadcast from the right
    return {d: d - off for d in range(len(xs)) if d - off >= 0 and ts[d - off] == xs[d]}
SILENT = aten_packets(
    "_assert_scalar", "_assert_async", "sym_size", "sym_numel", "sym_stride", "item",
    "_is_all_true", "_local_scalar_dense", "sym_constrain_range_for_size", "lift_fresh",
)
