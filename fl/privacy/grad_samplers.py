"""Per-sample gradient rules Opacus uses for this project's own layer types.

Opacus computes a grouped convolution's per-sample weight gradient as if the convolution were
dense and then keeps the diagonal blocks: for the Conformer's depthwise convolution (C groups of
one channel) that is C times the work, and the largest single cost of a DP-SGD step. The rule
here computes exactly the same numbers directly,

    grad_w[n, c, 0, k] = sum_t  backprop[n, c, t] * input_padded[n, c, t + k],
    grad_b[n, c]       = sum_t  backprop[n, c, t],

so clipping, and with it the DP-SGD guarantee, is unchanged (``tests/test_grad_samplers.py``
checks it against Opacus' generic rule and against per-example autograd gradients).
Importing this module registers the rules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from opacus.grad_sample.utils import register_grad_sampler
from torch import nn

from fl.model.conformer import DepthwiseConv1d


@register_grad_sampler(DepthwiseConv1d)
def depthwise_conv1d_grad_sample(
    layer: DepthwiseConv1d, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of a :class:`DepthwiseConv1d`: ``[N, C, 1, K]`` and ``[N, C]``."""
    x = activations[0].to(backprops.dtype)  # [N, C, T]
    pad = layer.padding[0]  # type: ignore[index]
    kernel = layer.kernel_size[0]
    out: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        # the sum over t for every (n, c) pair at once: a convolution with N*C groups, the padded
        # input as signal and the output gradient as filter
        n, c, t = backprops.shape
        signal = F.pad(x, (pad, pad)).reshape(1, n * c, t + 2 * pad)
        grad = F.conv1d(signal, backprops.reshape(n * c, 1, t), groups=n * c) if n else x.new_zeros(1, 0, kernel)
        out[layer.weight] = grad.reshape(n, c, 1, kernel)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = backprops.sum(dim=2)
    return out
