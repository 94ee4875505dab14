"""Secret randomness for every DP draw: a 256-bit secret per party, one independent stream per purpose.

A DP guarantee holds only against someone who cannot regenerate the noise (or the sampling). So
every DP draw -- the server's noise and cohorts, a device's DP-SGD noise, Poisson batches,
user-level noise share and clip-bit noise -- comes from a :class:`Secret` held by the party that
makes the draw: the server's run secret, or each device's own secret. A secret is 32 bytes from
the OS CSPRNG (``secrets.token_bytes``), written once to a private file (mode 0600) so resume and
replay stay bit-identical, and never sent or published.

A stream is named by a purpose and an index (a round, a device release counter): its key is
HMAC-SHA256(secret, purpose | index). Streams of different purposes or indices are independent
(HMAC is a PRF); knowing the config, the seed, the models and every other stream tells nothing
about a stream's key. What the stream feeds:

* :meth:`Secret.generator` -- a ``torch.Generator`` seeded with 64 bits of the key (Gaussian
  noise). Regenerating one stream's noise means searching 2**64 seeds for that single stream;
  with ``secure_mode`` the samples are also drawn with Opacus' floating-point-attack mitigation.
* :meth:`Secret.random` -- a ``random.Random`` seeded with the whole 256-bit key (Poisson
  batches, cohorts).

``reproducible`` secrets (``privacy.reproducible=true``, simulation only) are derived from the
config seed instead: exact reruns for research, and *no protection against anyone who holds the
config*. Every report of such a run says so (:data:`REPRODUCIBLE_LABEL`).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import random
import secrets
from dataclasses import dataclass
from pathlib import Path

import torch

SECRET_BYTES = 32
REPRODUCIBLE_LABEL = "reproducible noise: no protection against anyone holding the config"

# Purposes: one stream family each. Server side:
SERVER_NOISE = "server-noise"  # central user-level noise on the round's sum
COHORT = "cohort"  # which devices are sampled in a round
CLIP_COUNT = "clip-count"  # noise on the adaptive-clipping count (central)
# Device side (indexed by the device's release counter):
DP_SGD_NOISE = "dp-sgd-noise"  # Opacus' Gaussian noise on the clipped per-example gradient sum
BATCHES = "batches"  # Poisson sampling of each DP-SGD step's batch
USER_NOISE = "user-noise"  # the device's share of user-level noise (local, distributed)
CLIP_BIT = "clip-bit"  # noise on the device's adaptive-clipping bit (local, distributed)
TRAINING = "training"  # everything else on the device that is random (dropout, plain batches)


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
        label = "|".join([purpose, *map(str, index)]).encode()
        return hmac.new(self.key, label, hashlib.sha256).digest()

    def generator(self, purpose: str, *index: int | str) -> torch.Generator:
        """A CPU ``torch.Generator`` for one stream (64 bits of its key as the seed)."""
        seed = int.from_bytes(self.stream_key(purpose, *index)[:8], "big")
        return torch.Generator().manual_seed(seed)

    def random(self, purpose: str, *index: int | str) -> random.Random:
        """A ``random.Random`` for one stream, seeded with the whole 256-bit key."""
        return random.Random(int.from_bytes(self.stream_key(purpose, *index), "big"))


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) readable by its owner only (0700); returns it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path
