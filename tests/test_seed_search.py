"""The 32-bit seed search of the audit, run as the attacker: it finds torch-seeded noise (the
control) and nothing of a secret ChaCha20 stream (see ``tests/seed_search.py``)."""

from __future__ import annotations

import torch

from fl.config import UserPrivacyConfig
from fl.privacy.randomness import SERVER_NOISE, Secret
from fl.privacy.user import UserLevel
from tests.seed_search import key_seeds, search_seeds


def test_a_seed_search_finds_torch_seeded_noise_but_never_a_secret_stream():
    """The attack of the audit, scaled down: 2**20 torch seeds (of 2**32: torch keeps 32 bits of a
    seed) and every numpy family. It recovers the noise of a torch generator seeded with 64 bits whose
    low bits are in range -- what the pre-ChaCha code drew -- and nothing of the secret stream,
    not even with every seed that any part of the stream's key could give."""
    cfg = UserPrivacyConfig(noise="central", noise_multiplier=2.0, clipping_norm=1.0)
    user = UserLevel(cfg, devices=4, expected_cohort=4, sampling="fixed", planned_rounds=2)
    secret = Secret(bytes(range(32)))  # pinned: the test is deterministic
    release = user.aggregate([], {"w": torch.zeros(64)}, [], secret, server_round=1)["w"] * 4
    std = 2.0
    old_seed = (0x9E3779B9 << 32) | 0xBEEF  # 64 bits, low 32 bits in the searched range
    old = torch.normal(0.0, std, (64,), generator=torch.Generator().manual_seed(old_seed))
    assert ("torch", 0xBEEF) in search_seeds(old, std, bits=20)  # positive control: the attack works
    key = secret.stream_key(SERVER_NOISE, 1)
    assert search_seeds(release, std, bits=20, extra=key_seeds(key)) == []
