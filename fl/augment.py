"""SpecAugment-style masking for central pretraining (never applied to device training)."""

from __future__ import annotations

from dataclasses import replace

import torch

from fl.data.features import Batch


def _band_mask(size: int, limit: torch.Tensor, max_width: torch.Tensor, count: int,
               generator: torch.Generator) -> torch.Tensor:
    """``[B, size]`` True inside ``count`` random bands per row, each within ``[0, limit)``."""
    b = limit.shape[0]
    width = (torch.rand(b, count, generator=generator) * (max_width[:, None] + 1)).floor()
    start = (torch.rand(b, count, generator=generator) * (limit[:, None] - width).clamp_min(1)).floor()
    pos = torch.arange(size, dtype=torch.float32)[None, None, :]
    inside = (pos >= start[..., None]) & (pos < (start + width)[..., None])
    return inside.any(dim=1)


def spec_augment(batch: Batch, generator: torch.Generator, freq_masks: int = 2, freq_width: int = 8,
                 time_masks: int = 2, time_fraction: float = 0.05) -> Batch:
    """Zero random mel bands and random time spans of every utterance (within its own length)."""
    b, t, f = batch.feats.shape
    lens = batch.feat_lens.float().cpu()  # the masks are drawn on the CPU (the generator's device)
    freq = _band_mask(f, torch.full((b,), float(f)), torch.full((b,), float(freq_width)), freq_masks, generator)
    time = _band_mask(t, lens, (lens * time_fraction).floor(), time_masks, generator)
    keep = ~(freq[:, None, :] | time[:, :, None])
    return replace(batch, feats=batch.feats * keep.to(batch.feats.device))
