"""The depthwise convolution's per-sample gradient rule gives Opacus' numbers (end to end: tests/test_model.py)."""

import torch
from opacus.grad_sample.conv import compute_conv_grad_sample
from torch import nn

from fl.model.conformer import DepthwiseConv1d
from fl.privacy.grad_samplers import depthwise_conv1d_grad_sample


def test_the_depthwise_rule_matches_opacus_generic_convolution_rule():
    torch.manual_seed(0)
    layer = DepthwiseConv1d(6, 5)
    dense = nn.Conv1d(6, 6, 5, padding=2, groups=6)
    dense.load_state_dict(layer.state_dict())
    x, g = torch.randn(3, 6, 11), torch.randn(3, 6, 11)
    ours = depthwise_conv1d_grad_sample(layer, [x], g)
    ref = compute_conv_grad_sample(dense, [x], g)
    assert torch.allclose(ours[layer.weight], ref[dense.weight], atol=1e-5)
    assert torch.allclose(ours[layer.bias], ref[dense.bias], atol=1e-5)
