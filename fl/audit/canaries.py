"""Canaries: secret phrases planted in some devices' training data, and their exposure.

Following Carlini et al. ("The Secret Sharer", 2019), each canary is a random phrase (random
words, spoken by one synthetic eSpeak NG voice in noise) drawn from a space that also yields
``references``: phrases drawn the same way and never planted. A model that memorised a planted
canary gives it a lower loss than the references; its rank among them gives the exposure
``log2(R + 1) - log2(rank)``, from 0 (no better than a random reference, at the bottom) to
``log2(R + 1)`` bits (lowest loss of all). A canary the model never saw has a uniformly random rank,
hence an expected exposure of about 1.4 bits (``1/ln 2``); only consistently higher exposure of
the planted canaries is evidence of memorisation.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from typing import Mapping, Sequence

import numpy as np
import torch

from fl.data.audio import TARGET_SR
from fl.data.embedded import Condition, SpeakerProfile, render
from fl.data.features import Example
from fl.data.fleet import DeviceData
from fl.data.sentences import vocabulary
from fl.model import Recognizer

PREFIX = "canary-"
"""Every canary example id (and each planted copy's) starts with this."""
_VOICE = SpeakerProfile("canary", "en-us", pitch=50, rate=165, pitch_range=50, condition=Condition(noise_snr_db=10.0))


@dataclass(frozen=True)
class Canaries:
    planted: list[Example]
    references: list[Example]


def make_canaries(planted: int, references: int, words: int, recognizer: Recognizer, seed: int) -> Canaries:
    """``planted + references`` distinct random phrases, rendered and featurised the same way."""
    rng = random.Random(f"unheard-canaries:{seed}")
    lexicon = sorted(vocabulary())
    texts: list[str] = []
    while len(texts) < planted + references:
        text = " ".join(rng.sample(lexicon, words))
        if text not in texts:
            texts.append(text)
    audio = [render(text, _VOICE, np.random.default_rng([seed, i])) for i, text in enumerate(texts)]
    examples = []
    for i, (text, wave, feats) in enumerate(zip(texts, audio, recognizer.features(audio))):
        tokens = torch.tensor(recognizer.encode(text), dtype=torch.long)
        examples.append(Example(f"{PREFIX}{i:03d}", "canary", feats.to(torch.float16), tokens, text,
                                len(wave) / TARGET_SR))
    return Canaries(examples[:planted], examples[planted:])


def plant(devices: Mapping[str, DeviceData], canaries: Sequence[Example], repeats: int,
          seed: int) -> tuple[dict[str, DeviceData], dict[str, str]]:
    """Add each canary ``repeats`` times to the training data of its own device (distinct devices).

    Returns the new fleet and, for each canary id, the device that holds it.
    """
    if len(canaries) > len(devices):
        raise ValueError(f"{len(canaries)} canaries need as many devices; the fleet has {len(devices)}")
    chosen = random.Random(f"unheard-plant:{seed}").sample(sorted(devices), len(canaries))
    fleet = dict(devices)
    for canary, device_id in zip(canaries, chosen):
        d = fleet[device_id]
        copies = [replace(canary, id=f"{canary.id}-copy{k}", speaker=d.train[0].speaker if d.train else canary.speaker)
                  for k in range(repeats)]
        fleet[device_id] = DeviceData(d.device_id, d.train + copies, d.test)
    return fleet, {c.id: device_id for c, device_id in zip(canaries, chosen)}


def exposure(canary_loss: float, reference_losses: Sequence[float]) -> tuple[int, float]:
    """Rank (1 = lowest loss) of a canary among the references, and its exposure in bits."""
    if not reference_losses:
        raise ValueError("exposure needs reference losses")
    rank = 1 + sum(1 for x in reference_losses if x < canary_loss)
    return rank, math.log2(len(reference_losses) + 1) - math.log2(rank)
