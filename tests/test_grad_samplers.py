"""Per-sample gradients under DP-SGD are exactly each example's own gradient (what clipping bounds)."""

import torch
from opacus import GradSampleModule
from opacus.grad_sample.conv import compute_conv_grad_sample
from torch import nn

from fl.data.features import collate
from fl.data.text import CharTokenizer
from fl.model.conformer import ConformerCTC, DepthwiseConv1d
from fl.privacy.grad_samplers import depthwise_conv1d_grad_sample
from fl.train import ctc_losses
from tests.conftest import TINY, fake_examples


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


def test_per_sample_gradients_equal_each_examples_own_gradient():
    tok = CharTokenizer()
    torch.manual_seed(0)
    model = ConformerCTC(TINY, tok.vocab_size)
    examples = fake_examples(4)
    own = []
    for e in examples:  # each example alone, plain autograd
        model.zero_grad()
        ctc_losses(model, collate([e], TINY.n_mels), tok.blank).mean().backward()
        own.append({n: p.grad.clone() for n, p in model.named_parameters()})
    model.zero_grad(set_to_none=True)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    batch = collate(examples, TINY.n_mels)
    feats = batch.feats.requires_grad_()
    ctc_losses(gsm, batch, tok.blank).mean().backward(inputs=[feats])  # as fl.privacy.sample.private_step
    for name, p in gsm.named_parameters():
        name = name.removeprefix("_module.")
        assert p.grad is None  # the summed gradient was never computed
        for i in range(len(examples)):
            assert torch.allclose(p.grad_sample[i], own[i][name], atol=1e-5, rtol=1e-4), (name, i)
