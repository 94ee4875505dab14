"""The Conformer-CTC behind the recognizer contract: shapes, padding invariance, per-sample gradients."""

import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator

from fl.config import ModelConfig
from fl.data.features import collate
from fl.model import build_recognizer
from fl.model.conformer import ConformerCTC, ConformerRecognizer, count_parameters
from fl.privacy.sample import per_sample_backward
from tests.conftest import TINY


def test_default_model_size_is_in_the_promised_range(tokenizer):
    n = count_parameters(ConformerCTC(ModelConfig(), tokenizer.vocab_size))
    assert 1_000_000 <= n <= 3_000_000


def test_opacus_accepts_the_model(conformer):
    assert ModuleValidator.validate(conformer.new_module(), strict=False) == []


def test_the_factory_builds_each_kind_and_refuses_others():
    assert isinstance(build_recognizer(TINY), ConformerRecognizer)
    try:
        build_recognizer(ModelConfig(kind="lstm"))
    except ValueError as e:
        assert "lstm" in str(e)
    else:
        raise AssertionError("an unknown model.kind must be refused")


def test_trainable_selection_freezes_the_rest_and_an_empty_selection_is_refused(conformer):
    head = ConformerRecognizer(TINY, r"^head\.")
    module = head.new_module()
    assert [n for n, p in module.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    assert set(head.shared(module)) == set(module.state_dict())  # the Conformer shares its whole state
    try:
        ConformerRecognizer(TINY, "nothing-matches").new_module()
    except ValueError as e:
        assert "matches no parameter" in str(e)
    else:
        raise AssertionError("a selection that trains nothing must be refused")


def test_output_of_an_example_does_not_depend_on_batch_padding(conformer, examples):
    torch.manual_seed(0)
    model = conformer.new_module().eval()
    batch = collate(examples)
    lp, lens = model(batch.feats, batch.feat_lens)
    for i, e in enumerate(examples):
        single = collate([e])
        lp1, len1 = model(single.feats, single.feat_lens)
        assert int(len1[0]) == int(lens[i])
        torch.testing.assert_close(lp1[0, : len1[0]], lp[i, : lens[i]], atol=1e-4, rtol=1e-4)


def test_per_sample_gradients_match_single_example_gradients(conformer, examples):
    """What DP-SGD clips is each example's own gradient (depthwise rule: fl/privacy/grad_samplers.py)."""
    torch.manual_seed(0)
    model = conformer.new_module()
    reference = conformer.module_from(conformer.shared(model))
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    per_sample_backward(gsm, conformer, collate(examples[:6]))  # as every DP-SGD step does
    assert all(p.grad is None for p in model.parameters())  # the unused summed gradient is never computed
    for i, e in enumerate(examples[:6]):
        reference.zero_grad()
        conformer.losses(reference, collate([e])).sum().backward()
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad_sample[i], q.grad, atol=2e-4, rtol=1e-3, msg=name)
