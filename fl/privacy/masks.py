"""Full-strength SecAgg+ masks: expand each mask seed with ChaCha20 instead of a 32-bit Mersenne Twister.

Flower 1.42's ``pseudo_rand_gen`` XOR-folds a 256-bit shared key (or private mask seed) into a
32-bit seed for ``numpy.random.RandomState``, so any single mask could be found by a 2**32 search.
``chacha_masks`` keys ChaCha20 (a cryptographic stream cipher, from the ``cryptography`` package
Flower already depends on) with SHA-256 of the whole seed, so finding a mask means breaking
ChaCha20. ``install`` puts it in place of ``pseudo_rand_gen`` in the two Flower modules that call
it -- the server's SecAgg+ workflow and the device's SecAgg+ mod -- and both sides of a round must
run it (``server/secure_round.py`` and ``clients/secure_app.py`` do, on import).
"""

from __future__ import annotations

import hashlib
import importlib

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

_NONCE = bytes(16)  # one key per seed, used once per call: a fixed nonce is fine


def chacha_masks(seed: bytes, num_range: int, dimensions_list: list[tuple[int, ...]]) -> list[np.ndarray]:
    """Masks in [0, num_range - 2] of the given shapes, a deterministic function of the whole ``seed``.

    Same contract as Flower's ``pseudo_rand_gen`` (which draws ``randint(0, num_range - 1)``). Each
    value is a 64-bit keystream word reduced modulo ``num_range - 1``; for ranges up to 2**32 the
    modulo bias is below 2**-32.
    """
    if num_range < 2 or num_range > 2**32:
        raise ValueError(f"num_range must be in [2, 2**32], got {num_range}")
    key = hashlib.sha256(seed).digest()
    sizes = [int(np.prod(d)) if len(d) else 1 for d in dimensions_list]
    stream = Cipher(algorithms.ChaCha20(key, _NONCE), mode=None).encryptor().update(bytes(8 * sum(sizes)))
    words = np.frombuffer(stream, dtype="<u8") % np.uint64(num_range - 1)
    out, start = [], 0
    for dims, n in zip(dimensions_list, sizes):
        chunk = words[start : start + n].astype(np.int64)
        out.append(np.array(chunk[0], dtype=np.int64) if len(dims) == 0 else chunk.reshape(dims))
        start += n
    return out


def install() -> None:
    """Replace Flower's 32-bit-seeded mask generator on this side of the protocol (idempotent)."""
    # import_module, not ``from ... import``: the packages re-export functions under the modules' names
    for name in ("flwr.client.mod.secure_aggregation.secaggplus_mod",
                 "flwr.server.workflow.secure_aggregation.secaggplus_workflow"):
        module = importlib.import_module(name)
        module.pseudo_rand_gen = chacha_masks  # type: ignore[attr-defined]
