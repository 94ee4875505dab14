"""The attacker's seed search: every non-cryptographic generator torch and numpy offer, seeded with
anything public or with any part of a stream key, against a released noise.

The audit of eeae021 stripped a run's central noise in 565 s by searching torch's 2**32 seeds: the
code seeded ``torch.Generator`` with 64 bits of the stream key and torch keeps 32 of them. The
search here is that attack scaled down to run in the suite (2**20 torch seeds), widened to every
numpy bit generator and to every seed a stream key could give; ``tests/test_attacks.py`` reuses
:class:`Seeded` for the public seed schemes.
"""

from __future__ import annotations

import numpy as np
import torch

NUMPY_FAMILIES = ("MT19937", "PCG64", "PCG64DXSM", "Philox", "SFC64")


class Seeded:
    """A generator of one family seeded with ``seed``, drawing Gaussians the way the code would."""

    def __init__(self, family: str, seed: int) -> None:
        self.family, self.seed = family, seed

    def gaussian_like(self, tensors, std, secure=False) -> list[torch.Tensor]:
        """One generator for all tensors, drawn in order (as the pre-ChaCha code consumed its generator)."""
        if self.family.startswith("torch"):
            g = torch.Generator().manual_seed(self.seed)
            draw = lambda shape: torch.normal(0.0, std, shape, generator=g,  # noqa: E731
                                              dtype=torch.float64 if self.family == "torch64" else torch.float32)
        elif self.family == "RandomState":
            rs = np.random.RandomState(self.seed % 2**32)
            draw = lambda shape: torch.from_numpy(rs.normal(0.0, std, shape))  # noqa: E731
        else:
            gen = np.random.Generator(getattr(np.random, self.family)(self.seed))
            draw = lambda shape: torch.from_numpy(gen.normal(0.0, std, shape))  # noqa: E731
        return [draw(tuple(t.shape)).to(t.dtype) for t in tensors]

    def gaussian(self, shape, std, dtype=torch.float32, device="cpu", secure=False) -> torch.Tensor:
        return self.gaussian_like([torch.empty(tuple(shape), dtype=dtype)], std, secure)[0]


FAMILIES = ("torch", "torch64", "RandomState", *NUMPY_FAMILIES)


def key_seeds(key: bytes) -> list[int]:
    """Every seed an implementation could have taken from a stream key: each 4- and 8-byte window in
    both byte orders, and the whole key (reduced to 32 and 64 bits)."""
    seeds = {int.from_bytes(key, "big") % 2**32, int.from_bytes(key, "big") % 2**64}
    for width in (4, 8):
        for i in range(len(key) - width + 1):
            seeds |= {int.from_bytes(key[i:i + width], order) for order in ("big", "little")}
    return sorted(seeds)


def search_seeds(observed: torch.Tensor, std: float, bits: int, extra: list[int] = ()) -> list[tuple[str, int]]:
    """Every (family, seed) whose Gaussians start like ``observed``: torch's generator over all
    2**bits seeds drawing float32 (as the pre-ChaCha code did) and over 2**(bits - 4) drawing
    float64, numpy's families over 2**(bits - 6) (2**(bits - 8) for the slow Mersenne Twisters),
    and ``extra`` seeds in every family. A draw of 16 values (torch's vectorised size) matching to
    1e-4 relative is a regenerated noise stream."""
    target = observed.flatten()[:16].double()
    first, tol = float(target[0]), 1e-4 * abs(float(target[0])) + 1e-6 * std
    hits = []

    def match(candidate: torch.Tensor) -> bool:
        return abs(float(candidate[0]) - first) <= tol and bool(
            torch.allclose(candidate.double(), target, rtol=1e-4, atol=1e-6 * std))

    g = torch.Generator()
    for dtype, name, count in ((torch.float32, "torch", 2**bits), (torch.float64, "torch64", 2 ** (bits - 4))):
        for s in range(count):
            g.manual_seed(s)
            if match(torch.normal(0.0, std, (16,), generator=g, dtype=dtype)):
                hits.append((name, s))
    for family in ("RandomState", *NUMPY_FAMILIES):
        seeds = range(2 ** (bits - (8 if family in ("RandomState", "MT19937") else 6)))
        hits += [(family, s) for s in seeds if match(Seeded(family, s).gaussian((16,), std, torch.float64))]
    for family in FAMILIES:
        hits += [(family, s) for s in extra if match(Seeded(family, s).gaussian((16,), std, torch.float64))]
    return hits
