"""`unheard-bench`: speed figures, printed and written to bench.json.

dp_step: seconds per training step of the default model on a batch of 16 utterances of 4 s,
non-private (AdamW) vs DP-SGD (Opacus per-sample gradients, clipping and noise), and their ratio.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

from fl.config import ModelConfig, SamplePrivacyConfig, TrainConfig
from fl.data.features import Batch
from fl.data.text import CharTokenizer
from fl.model.conformer import ConformerCTC
from fl.privacy.sample import make_private, private_step
from fl.train import ctc_losses


def _batch(cfg: ModelConfig, size: int, seconds: float, chars: int) -> Batch:
    g = torch.Generator().manual_seed(0)
    frames = int(seconds * 100)
    tokens = torch.randint(1, CharTokenizer().vocab_size, (size, chars), generator=g)
    return Batch(torch.randn(size, frames, cfg.n_mels, generator=g), torch.full((size,), frames),
                 tokens, torch.full((size,), chars))


def _time(step, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        step()
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - started) / repeats


def dp_step(repeats: int = 10, batch_size: int = 16, seconds: float = 4.0) -> dict[str, float]:
    cfg = ModelConfig()
    blank = CharTokenizer().blank
    batch = _batch(cfg, batch_size, seconds, chars=60)
    torch.manual_seed(0)
    model = ConformerCTC(cfg, CharTokenizer().vocab_size)
    plain_opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def plain() -> None:
        plain_opt.zero_grad(set_to_none=True)
        ctc_losses(model, batch, blank).mean().backward()
        plain_opt.step()

    torch.manual_seed(0)
    gsm, dp_opt = make_private(ConformerCTC(cfg, CharTokenizer().vocab_size), TrainConfig(lr=1e-4),
                               SamplePrivacyConfig(noise_multiplier=1.0, max_grad_norm=1.0), batch_size, seed=0)

    def private() -> None:
        private_step(gsm, dp_opt, batch, blank)

    non_dp = _time(plain, 2, repeats)
    dp = _time(private, 2, repeats)
    return {"non_dp_seconds_per_step": non_dp, "dp_seconds_per_step": dp, "dp_step_ratio": dp / non_dp}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench.json")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    figures = {"threads": torch.get_num_threads(), **dp_step(args.repeats)}
    Path(args.out).write_text(json.dumps(figures, indent=2))
    for k, v in figures.items():
        print(f"{k:>26}: {v:.4g}" if isinstance(v, float) else f"{k:>26}: {v}")


if __name__ == "__main__":
    main()
