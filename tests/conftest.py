import random

import pytest
import torch

from fl.config import ModelConfig
from fl.data.features import Example
from fl.data.text import CharTokenizer

TINY = ModelConfig(n_mels=16, d_model=32, layers=2, heads=2, ff_mult=2, conv_kernel=5, subsample=3, dropout=0.0)


@pytest.fixture
def tokenizer() -> CharTokenizer:
    return CharTokenizer()


def fake_examples(n: int, seed: int = 0, n_mels: int = 16) -> list[Example]:
    """Random-feature examples of varied lengths with real transcripts (for model/optimizer tests)."""
    rng = random.Random(seed)
    tok = CharTokenizer()
    words = ["turn", "on", "the", "lights", "play", "music", "call", "mom", "set", "a", "timer"]
    out = []
    for i in range(n):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 3)))
        frames = rng.randint(40, 90)
        g = torch.Generator().manual_seed(seed * 1000 + i)
        feats = torch.randn(frames, n_mels, generator=g).to(torch.float16)
        out.append(Example(f"u{i:03d}", f"s{i % 3}", feats, torch.tensor(tok.encode(text)), text))
    return out


@pytest.fixture
def examples() -> list[Example]:
    return fake_examples(12)


@pytest.fixture(scope="session")
def sim_cache(tmp_path_factory):
    """One corpus/feature/seed-model cache shared by every end-to-end simulation of a test session."""
    return tmp_path_factory.mktemp("sim-cache")
