"""Run the leakage audits on one final model: their figures (one JSON-able dict each, published in
``audit.json``) and the per-utterance losses the figures were computed from (the experimenter's own,
kept private, so that anyone holding them can recompute every figure independently)."""

from __future__ import annotations

import random
from dataclasses import asdict
from typing import Mapping, Optional, Sequence

from torch import nn

from fl.audit.canaries import Canaries, exposure
from fl.audit.membership import loss_attack
from fl.data.features import Example
from fl.data.fleet import DeviceData
from fl.model import Recognizer
from fl.train import utterance_losses


def _cap(examples: list[Example], limit: int, rng: random.Random) -> list[Example]:
    return examples if not limit or len(examples) <= limit else rng.sample(examples, limit)


def membership_audit(
    recognizer: Recognizer, model: nn.Module, devices: Mapping[str, DeviceData], trained: set[str],
    held_out: Sequence[Example], limit: int, seed: int, exclude: Optional[set[str]] = None,
) -> tuple[dict, dict[str, list[float]]]:
    """Loss attack: training utterances of devices that trained against (a) the same devices'
    held-back test utterances and (b) evaluation speakers' utterances; ``limit`` per population.

    ``exclude``: example ids left out of the members (planted canary copies). Returns the figures
    and each population's losses (``members``, ``same_speakers``, ``other_speakers``).
    """
    rng = random.Random(f"unheard-mia:{seed}")
    skip = exclude or set()
    members = _cap([e for d in trained for e in devices[d].train if e.id not in skip], limit, rng)
    same = _cap([e for d in trained for e in devices[d].test], limit, rng)
    other = _cap(list(held_out), limit, rng)
    if not members:
        return {"members": 0, "note": "no device trained: nothing to attack"}, {}
    losses = utterance_losses(recognizer, model, members + same + other)
    scores = {name: [losses[e.id] for e in population]
              for name, population in (("members", members), ("same_speakers", same), ("other_speakers", other))}

    def attack(nonmembers: str) -> Optional[dict]:
        if not scores[nonmembers]:
            return None
        return asdict(loss_attack(scores["members"], scores[nonmembers]))

    return {"members": len(members), "same_speakers": attack("same_speakers"),
            "other_speakers": attack("other_speakers")}, scores


def canary_audit(recognizer: Recognizer, model: nn.Module, canaries: Canaries, holders: Mapping[str, str],
                 trained: set[str]) -> tuple[dict, dict]:
    """Each planted canary's rank and exposure among the never-planted references; returns the
    figures and the losses (``planted``: canary id -> loss, ``references``: the references' losses)."""
    losses = utterance_losses(recognizer, model, canaries.planted + canaries.references)
    reference = [losses[e.id] for e in canaries.references]
    rows = []
    for c in canaries.planted:
        rank, bits = exposure(losses[c.id], reference)
        rows.append({"canary": c.id, "text": c.text, "device": holders[c.id], "trained": holders[c.id] in trained,
                     "rank": rank, "exposure": bits})
    seen = [r["exposure"] for r in rows if r["trained"]]
    return {
        "planted": len(rows), "references": len(reference), "trained": len(seen),
        "mean_exposure": sum(seen) / len(seen) if seen else None,
        "max_exposure": max(seen) if seen else None, "canaries": rows,
    }, {"planted": {c.id: losses[c.id] for c in canaries.planted}, "references": reference}
