"""Secret randomness for every DP draw: a 256-bit secret per party, one ChaCha20 stream per purpose.

A DP guarantee holds only against someone who cannot regenerate the noise (or the sampling). So
every DP draw -- the server's noise, adaptive-clipping count noise and cohorts, a device's
DP-SGD noise, Poisson batches and user-level noise share -- comes from a :class:`Secret` held by the party that
makes the draw: the server's run secret, or each device's own secret. A secret is 32 bytes from
the OS CSPRNG (``secrets.token_bytes``), written once to a private file (mode 0600) so resume and
replay stay bit-identical, and never sent or published.

A stream is named by a purpose and an index (a round, a device release counter): its key is
HMAC-SHA256(secret, JSON [purpose, *index]), all 256 bits of it. Streams of different purposes
or indices are independent (HMAC is a PRF); knowing the config, the seed, the models and every other stream
tells nothing about a stream's key. :meth:`Secret.stream` expands the key with ChaCha20 (RFC 8439,
from the ``cryptography`` package, as ``fl/privacy/masks.py`` does for SecAgg+ masks) into a
:class:`Stream`: 53-bit uniforms, coins, samples without replacement and float64 Gaussians (Box-
Muller). Regenerating a stream means finding its 256-bit key or breaking ChaCha20: no search over
seeds reproduces it. No DP draw is made by torch's or numpy's generators: they are not
cryptographic (torch's CPU generator keeps 32 bits of a seed, found in minutes by brute force).

``secure=True`` Gaussians add Opacus' floating-point-attack mitigation (Holohan & Braghin 2021,
section 5.1, as ``opacus.optimizers.optimizer._generate_noise(secure_mode=True)``): each sample
is the sum of four independent N(0, std^2) draws from four different Box-Muller pairs, halved.

``reproducible`` secrets (``privacy.reproducible=true``, simulation only) are derived from the
config seed instead: exact reruns for research, and *no protection against anyone who holds the
config*. Every report of such a run says so (:data:`REPRODUCIBLE_LABEL`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, TypeVar

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

SECRET_BYTES = 32
REPRODUCIBLE_LABEL = "reproducible noise: no protection against anyone holding the config"

# Purposes: one stream family each. Server side:
SERVER_NOISE = "server-noise"  # central noise on the round's sum (user level, or DP-FedSGD's total)
COHORT = "cohort"  # which devices are sampled in a round
CLIP_COUNT = "clip-count"  # noise on the adaptive-clipping count (central)
# Device side (indexed by the device's release counter):
DP_SGD_NOISE = "dp-sgd-noise"  # Opacus' Gaussian noise on the clipped per-example gradient sum
BATCHES = "batches"  # Poisson sampling of each DP-SGD step's batch
USER_NOISE = "user-noise"  # the device's share of user-level noise (local, distributed)
TRAINING = "training"  # everything else on the device that is random (dropout, plain batches)
SPLIT = "split"  # a deployed device's train/test assignment of each recording (keyed, not drawn)
CORRECTIONS = "corrections"  # which recordings a simulated user corrected (keyed by recording id, fixed)

_TWO53 = float(2**53)
_NONCE = bytes(16)  # ChaCha20's 32-bit block counter and 96-bit nonce, all zero: one key per stream
T = TypeVar("T")


class Stream:
    """One stream of secret randomness: the ChaCha20 keystream of a 256-bit key.

    Guarantee: every value drawn is a deterministic function of the whole key (flip any bit and the
    stream changes), and without the key the values are indistinguishable from uniform randomness
    to anyone who cannot break ChaCha20. Draws consume the keystream in order, so the same calls on
    the same key return the same values (resume and replay are exact). Gaussians are computed in
    float64 from 53-bit uniforms and rounded to the requested dtype at the end.
    """

    def __init__(self, key: bytes) -> None:
        if len(key) != SECRET_BYTES:
            raise ValueError(f"a stream key is {SECRET_BYTES} bytes, got {len(key)}")
        self._cipher = Cipher(algorithms.ChaCha20(key, _NONCE), mode=None).encryptor()

    def __repr__(self) -> str:  # never print the key
        return "Stream()"

    def words(self, n: int) -> np.ndarray:
        """``n`` uniform 64-bit words (little-endian keystream)."""
        if n < 0:
            raise ValueError(f"cannot draw {n} words")
        return np.frombuffer(self._cipher.update(bytes(8 * n)), dtype="<u8")

    def uniform(self, n: int) -> np.ndarray:
        """``n`` float64 uniforms on [0, 1), each a multiple of 2**-53 (all 53 bits random)."""
        return (self.words(n) >> np.uint64(11)).astype(np.float64) * (1.0 / _TWO53)

    def random(self) -> float:
        """One uniform on [0, 1)."""
        return float(self.uniform(1)[0])

    def coins(self, n: int, rate: float) -> list[int]:
        """Indices of ``n`` independent coins that came up with probability ``rate`` (Poisson sampling)."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"a coin's rate must be in [0, 1], got {rate!r}")
        return np.flatnonzero(self.uniform(n) < rate).tolist()

    def choose(self, items: Sequence[T], k: int) -> list[T]:
        """``k`` of ``items`` uniformly without replacement (in the items' order)."""
        if not 0 <= k <= len(items):
            raise ValueError(f"cannot choose {k} of {len(items)} items")
        keep = np.sort(np.argsort(self.uniform(len(items)), kind="stable")[:k])
        return [items[i] for i in keep.tolist()]

    def standard_normal(self, n: int) -> torch.Tensor:
        """``n`` i.i.d. N(0, 1) samples in float64 (Box-Muller on 53-bit uniforms, computed in place)."""
        pairs = (n + 1) // 2
        u = torch.from_numpy(self.uniform(2 * pairs))
        radius, angle = u[:pairs], u[pairs:]
        radius.neg_().log1p_().mul_(-2.0).sqrt_()  # sqrt(-2 ln(1 - u)), 1 - u in (0, 1]: finite
        angle.mul_(2.0 * math.pi)
        out = torch.empty(2 * pairs, dtype=torch.float64)
        torch.cos(angle, out=out[:pairs])
        torch.sin(angle, out=out[pairs:])
        out[:pairs].mul_(radius)
        out[pairs:].mul_(radius)
        return out[:n]

    def _four_pairs(self, n: int) -> torch.Tensor:
        """``n`` N(0, 1) samples, each the sum of four draws from four *different* Box-Muller pairs,
        halved (Opacus' mitigation, 2n = 4 draws: a cosine and a sine of one pair sum to a single
        Gaussian of the same two uniforms, which would undo it). ``standard_normal(4n)`` holds the
        cosines of pairs 0..2n-1, then their sines; each sine block is rotated by one coordinate,
        so coordinate j takes pairs j, n+j, j+1 and n+j+1 (mod n); n = 1 draws eight and keeps the
        four cosines."""
        if n == 1:
            return self.standard_normal(8)[:4].sum().mul(0.5).view(1)
        d = self.standard_normal(4 * n)
        cos_a, cos_b, sin_a, sin_b = d[:n], d[n:2 * n], d[2 * n:3 * n], d[3 * n:]
        return cos_a.add(cos_b).add_(sin_a.roll(-1)).add_(sin_b.roll(-1)).mul_(0.5)  # a new tensor: d is freed

    def gaussian(self, shape: Sequence[int] | torch.Size, std: float, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", secure: bool = False) -> torch.Tensor:
        """I.i.d. N(0, std^2) of ``shape`` in ``dtype`` on ``device`` (``secure``: Opacus' mitigation)."""
        return self.gaussian_like([torch.empty(tuple(shape), dtype=dtype, device=device)], std, secure)[0]

    def gaussian_like(self, tensors: Sequence[torch.Tensor], std: float, secure: bool = False) -> list[torch.Tensor]:
        """I.i.d. N(0, std^2) shaped like each of ``tensors`` (dtype and device too), drawn as one
        float64 vector in the tensors' order and split: one keystream call for a whole model."""
        if not (math.isfinite(std) and std >= 0):
            raise ValueError(f"noise std must be a finite number >= 0, got {std!r}")
        if std == 0:
            return [torch.zeros_like(t) for t in tensors]
        sizes = [t.numel() for t in tensors]
        z = self._four_pairs(sum(sizes)) if secure else self.standard_normal(sum(sizes))
        z.mul_(std)
        return [part.view(t.shape).to(dtype=t.dtype, device=t.device, copy=True)
                for part, t in zip(torch.split(z, sizes), tensors)]


@dataclass(frozen=True)
class Secret:
    """A party's 256-bit secret and the streams derived from it (see the module doc)."""

    key: bytes
    reproducible: bool = False

    def __post_init__(self) -> None:
        if len(self.key) != SECRET_BYTES:
            raise ValueError(f"a secret is {SECRET_BYTES} bytes, got {len(self.key)}")

    def __repr__(self) -> str:  # never print the key
        return f"Secret(reproducible={self.reproducible})"

    @classmethod
    def generate(cls) -> "Secret":
        """A fresh secret from the OS CSPRNG."""
        return cls(secrets.token_bytes(SECRET_BYTES))

    @classmethod
    def from_seed(cls, seed: int, owner: str) -> "Secret":
        """The reproducible secret of ``owner`` (``server``, ``device:KEY``) for config seed ``seed``.

        Anyone holding the config can recompute it: research simulations only.
        """
        return cls(hashlib.sha256(f"unheard-reproducible:{owner}:{seed}".encode()).digest(), reproducible=True)

    @classmethod
    def load_or_create(cls, path: Path) -> "Secret":
        """The secret kept in ``path``; drawn from the OS CSPRNG and written (mode 0600) the first time."""
        path = Path(path)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(SECRET_BYTES))
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(path)
        key = path.read_bytes()
        if len(key) != SECRET_BYTES:
            raise ValueError(f"{path} is not a {SECRET_BYTES}-byte secret ({len(key)} bytes): it was damaged; "
                             "restore it from backup (a new secret would break replay of the last round)")
        return cls(key)

    def stream_key(self, purpose: str, *index: int | str) -> bytes:
        """HMAC-SHA256 of ``purpose`` and ``index`` under the secret: the key of one stream."""
        label = json.dumps([purpose, *map(str, index)]).encode()  # unambiguous: ("a|b",) != ("a", "b")
        return hmac.new(self.key, label, hashlib.sha256).digest()

    def stream(self, purpose: str, *index: int | str) -> Stream:
        """The ChaCha20 stream for one purpose and index, keyed by the whole 256-bit stream key."""
        return Stream(self.stream_key(purpose, *index))


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) readable by its owner only (0700); returns it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path
