"""The acoustic model: shapes, padding invariance, and correct per-sample gradients under Opacus."""

import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator

from fl.config import ModelConfig
from fl.data.features import collate
from fl.model.conformer import ConformerCTC, count_parameters
from fl.privacy.sample import per_sample_backward
from fl.train import ctc_losses
from tests.conftest import TINY


def test_default_model_size_is_in_the_promised_range(tokenizer):
    n = count_parameters(ConformerCTC(ModelConfig(), tokenizer.vocab_size))
    assert 1_000_000 <= n <= 3_000_000


def test_opacus_accepts_the_model(tokenizer):
    model = ConformerCTC(TINY, tokenizer.vocab_size)
    assert ModuleValidator.validate(model, strict=False) == []


def test_output_of_an_example_does_not_depend_on_batch_padding(tokenizer, examples):
    torch.manual_seed(0)
    model = ConformerCTC(TINY, tokenizer.vocab_size).eval()
    batch = collate(examples, TINY.n_mels)
    lp, lens = model(batch.feats, batch.feat_lens)
    for i, e in enumerate(examples):
        single = collate([e], TINY.n_mels)
        lp1, len1 = model(single.feats, single.feat_lens)
        assert int(len1[0]) == int(lens[i])
        torch.testing.assert_close(lp1[0, : len1[0]], lp[i, : lens[i]], atol=1e-4, rtol=1e-4)


def test_per_sample_gradients_match_single_example_gradients(tokenizer, examples):
    """What DP-SGD clips is each example's own gradient (depthwise rule: fl/privacy/grad_samplers.py)."""
    torch.manual_seed(0)
    model = ConformerCTC(TINY, tokenizer.vocab_size)
    reference = ConformerCTC(TINY, tokenizer.vocab_size)
    reference.load_state_dict(model.state_dict())
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    per_sample_backward(gsm, collate(examples[:6], TINY.n_mels), tokenizer.blank)  # as every DP-SGD step does
    assert all(p.grad is None for p in model.parameters())  # the unused summed gradient is never computed
    for i, e in enumerate(examples[:6]):
        reference.zero_grad()
        ctc_losses(reference, collate([e], TINY.n_mels), tokenizer.blank).sum().backward()
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad_sample[i], q.grad, atol=2e-4, rtol=1e-3, msg=name)
