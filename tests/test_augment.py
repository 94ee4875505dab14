import torch

from fl.augment import spec_augment
from fl.data.features import collate
from tests.conftest import fake_examples


def test_spec_augment_masks_bands_inside_each_utterance_only():
    batch = collate(fake_examples(6))
    out = spec_augment(batch, torch.Generator().manual_seed(0), freq_masks=2, freq_width=4, time_masks=2,
                       time_fraction=0.1)
    zeroed = (out.feats == 0) & (batch.feats != 0)
    assert zeroed.any()
    for i, n in enumerate(batch.feat_lens.tolist()):
        assert not (out.feats[i, n:] != 0).any()  # padding stays padding
        masked_cols = zeroed[i, :n].all(dim=0).sum()
        assert masked_cols <= 2 * 4
    assert torch.equal(out.targets, batch.targets)
    again = spec_augment(batch, torch.Generator().manual_seed(0), freq_masks=2, freq_width=4, time_masks=2,
                         time_fraction=0.1)
    assert torch.equal(again.feats, out.feats)
