"""A batch-first Conformer CTC acoustic model that Opacus can train.

Why not torchaudio's Conformer: it is time-first, which breaks Opacus' per-sample gradients, and
it uses BatchNorm, which mixes examples. Here every parametrised layer is an ``nn.Linear``,
``nn.Conv1d`` or ``nn.LayerNorm`` (all with Opacus grad samplers), normalisation is per frame, and
padded frames are zeroed before every convolution and masked out of attention, so an example's
output (and so its gradient) does not depend on what else is in the batch.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fl.config import ModelConfig
from fl.data.features import Batch, LogMel
from fl.data.text import CharTokenizer
from fl.model import Recognizer, Transcripts


def frame_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """``[B, T]`` bool mask, True on valid frames."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


class FeedForward(nn.Module):
    def __init__(self, d: int, mult: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, d * mult)
        self.down = nn.Linear(d * mult, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.down(self.drop(F.silu(self.up(self.norm(x))))))


class SelfAttention(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        if d % heads:
            raise ValueError(f"d_model={d} is not divisible by heads={heads}")
        self.heads = heads
        self.norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [B, H, T, dh]
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask[:, None, None, :], dropout_p=self.dropout if self.training else 0.0
        )
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class DepthwiseConv1d(nn.Conv1d):
    """A depthwise, length-preserving ``nn.Conv1d`` (one filter per channel, stride 1, odd kernel).

    Its own type lets DP-SGD use a per-sample gradient rule that exploits the depthwise structure
    (``fl/privacy/grad_samplers.py``) instead of Opacus' generic grouped-convolution one.
    """

    def __init__(self, channels: int, kernel: int) -> None:
        if kernel % 2 == 0:
            raise ValueError(f"conv_kernel must be odd, got {kernel}")
        super().__init__(channels, channels, kernel, padding=kernel // 2, groups=channels)


class ConvModule(nn.Module):
    def __init__(self, d: int, kernel: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.pointwise_in = nn.Linear(d, 2 * d)
        self.depthwise = DepthwiseConv1d(d, kernel)
        self.frame_norm = nn.LayerNorm(d)
        self.pointwise_out = nn.Linear(d, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        y = F.glu(self.pointwise_in(self.norm(x)), dim=-1) * mask[..., None]
        y = self.depthwise(y.transpose(1, 2)).transpose(1, 2)
        y = F.silu(self.frame_norm(y))
        return self.drop(self.pointwise_out(y))


class ConformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.ff1 = FeedForward(d, cfg.ff_mult, cfg.dropout)
        self.attn = SelfAttention(d, cfg.heads, cfg.dropout)
        self.conv = ConvModule(d, cfg.conv_kernel, cfg.dropout)
        self.ff2 = FeedForward(d, cfg.ff_mult, cfg.dropout)
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + 0.5 * self.ff1(x)
        x = x + self.attn(x, mask)
        x = x + self.conv(x, mask)
        x = x + 0.5 * self.ff2(x)
        return self.norm(x) * mask[..., None]


def sinusoids(length: int, d: int) -> torch.Tensor:
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
    pe = torch.zeros(length, d)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)
    return pe


class ConformerCTC(nn.Module):
    """Log-mel frames ``[B, T, n_mels]`` -> CTC log-probabilities ``[B, T', vocab]``.

    Time is subsampled by ``cfg.subsample`` with a strided convolution before the blocks.
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        s = cfg.subsample
        self.subsample = nn.Conv1d(cfg.n_mels, cfg.d_model, kernel_size=2 * s - 1 if s > 1 else 1,
                                   stride=s, padding=s - 1)
        self.blocks = nn.ModuleList(ConformerBlock(cfg) for _ in range(cfg.layers))
        self.head = nn.Linear(cfg.d_model, vocab_size)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        conv = self.subsample
        k, st, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
        return torch.div(lengths + 2 * p - k, st, rounding_mode="floor") + 1

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out_lens = self.output_lengths(lengths)
        x = self.subsample(feats.transpose(1, 2)).transpose(1, 2)
        mask = frame_mask(out_lens, x.shape[1])
        x = F.silu(x) + sinusoids(x.shape[1], x.shape[2]).to(x)
        x = x * mask[..., None]
        for block in self.blocks:
            x = block(x, mask)
        return self.head(x).log_softmax(dim=-1), out_lens


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class ConformerRecognizer(Recognizer):
    """The Conformer-CTC over characters, trained from scratch (``model.kind=conformer``).

    Features are per-utterance normalised log-mel frames; the loss is CTC per transcript character;
    transcription is best-path decoding. The whole state is shared: the seed is pretrained by the
    server, so there is no pinned seed for a device to load frozen weights from.
    """

    kind = "conformer"
    pretrained = False

    def __init__(self, cfg: ModelConfig, trainable: Optional[str] = None, device: str = "cpu") -> None:
        self.cfg = cfg
        self.trainable = trainable or "."
        self.device_spec = device
        self.tokenizer = CharTokenizer()
        self._logmel = LogMel(cfg.n_mels)

    @property
    def feature_key(self) -> str:
        return f"logmel-v1:{self.cfg.n_mels}"

    def features(self, audio: Sequence[np.ndarray]) -> list[torch.Tensor]:
        return [self._logmel(a) for a in audio]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def new_module(self) -> ConformerCTC:
        module = ConformerCTC(self.cfg, self.tokenizer.vocab_size)
        self.select_trainable(module)
        return module.to(self.device)

    def losses(self, module: nn.Module, batch: Batch) -> torch.Tensor:
        """Per-example CTC loss, normalised by transcript length: ``[B]``."""
        log_probs, out_lens = module(batch.feats, batch.feat_lens)
        losses = F.ctc_loss(log_probs.transpose(0, 1), batch.targets, out_lens, batch.target_lens,
                            blank=self.tokenizer.blank, reduction="none", zero_infinity=True)
        return losses / batch.target_lens.clamp_min(1)

    @torch.no_grad()
    def transcribe(self, module: nn.Module, batch: Batch) -> Transcripts:
        """Best path: argmax per frame, merge repeats, drop blanks (CTC cannot loop: no cut needed)."""
        return Transcripts([text for text, _ in self._best_path(module, batch)])

    @torch.no_grad()
    def transcribe_with_confidence(self, module: nn.Module, batch: Batch) -> list[tuple[str, float]]:
        """:meth:`transcribe`'s text with the best path's mean log-probability per output frame."""
        return self._best_path(module, batch)

    def _best_path(self, module: nn.Module, batch: Batch) -> list[tuple[str, float]]:
        log_probs, lengths = module(batch.feats, batch.feat_lens)
        ids_all = log_probs.argmax(dim=-1)
        best = log_probs.gather(-1, ids_all[..., None])[..., 0]
        out = []
        for row, score, n in zip(ids_all, best, lengths.tolist()):
            ids = torch.unique_consecutive(row[:n]).tolist()
            text = " ".join(self.tokenizer.decode([i for i in ids if i != self.tokenizer.blank]).split())
            out.append((text, float(score[:n].mean()) if n else -math.inf))
        return out
