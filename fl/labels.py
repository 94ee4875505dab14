"""Where a device's training labels come from (``train.labels``), made on the device, never sent.

* ``transcripts``: each recording's own transcript (research corpora); a recording without one is
  not trained on.
* ``pseudo``: the device transcribes its training recordings with a teacher -- the global model it
  just received, or the pinned seed it loads itself (``train.teacher``) -- and keeps a pair when the
  greedy decode's confidence (:meth:`~fl.model.Recognizer.transcribe_with_confidence`: mean
  log-probability per decoding step) is at least ``train.pseudo_threshold``.
* ``corrections``: a recording the user corrected keeps its transcript, the rest are pseudo-labelled.
  In a simulation, which recordings count as corrected is drawn from the *device's secret*, keyed
  by the recording's id (:func:`is_corrected`), with probability ``data.corrected_fraction``.

Privacy: a pseudo-label is a function of one recording and of a model every party may know (the
global model or the seed), computed one recording at a time, and whether a pair is kept depends on
that pair alone; a correction draw depends on the device's secret and that recording's id alone. So
one recording more or less changes no other recording's label or selection, and the DP mechanisms'
per-recording clipping bounds the (recording, label) pair exactly as it bounded (recording,
transcript): the sample-level guarantee is unchanged. Which recordings train is decided before any
label exists (the batch is drawn from the device's randomness, then :class:`Labeler` labels what was
drawn), so a label never moves a sampling coin. Pseudo-labels, scores and the number kept stay in
this process; nothing here is returned to the server.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from fl.config import LABEL_SOURCES, TrainConfig
from fl.data.features import Example
from fl.data.text import TextError
from fl.model import Recognizer
from fl.privacy.randomness import CORRECTIONS, Secret


def is_corrected(secret: Secret, example_id: str, fraction: float) -> bool:
    """Whether the recording ``example_id`` is one the (simulated) user corrected: a uniform from the
    device's ChaCha20 stream keyed by (``corrections``, id) below ``fraction``. Fixed per recording and
    secret, independent of every other recording, unknowable without the device's secret."""
    return secret.stream(CORRECTIONS, example_id).random() < fraction


@torch.no_grad()
def pseudo_label(recognizer: Recognizer, teacher: nn.Module, examples: Sequence[Example], threshold: float
                 ) -> list[Example]:
    """``examples`` relabelled with ``teacher``'s greedy transcripts, keeping those whose confidence is
    at least ``threshold`` and whose text is not empty, in their order.

    Each recording is decoded alone (a batch of one), so its label never depends on which other
    recordings the device holds, not even through padding or floating-point batching. Decoding runs
    under ``model.autocast`` (:meth:`~fl.model.Recognizer.autocast`), like every inference."""
    was_training = teacher.training
    teacher.eval()
    kept: list[Example] = []
    try:
        for e in examples:
            with recognizer.autocast():  # decoding only (``model.autocast``); the labels' training stays float32
                (text, score), = recognizer.transcribe_with_confidence(teacher, recognizer.collate([e]))
            if not (score >= threshold and text.strip()):
                continue
            try:
                tokens = torch.tensor(recognizer.encode(text), dtype=torch.long)
            except (TextError, ValueError):  # a decode the tokenizer cannot take back: not trained on
                continue
            kept.append(replace(e, tokens=tokens, text=text))
    finally:
        teacher.train(was_training)
    return kept


class Labeler:
    """The (recording, label) pairs of one device release under ``train.labels``, made on demand.

    A training path draws its batch first -- Poisson coins, or a plain random batch, all from the
    device's own randomness and never from any label -- and then calls the labeler on the drawn
    recordings (:meth:`__call__`): only what is drawn is pseudo-labelled, each recording at most once
    per release, so the cost follows the batch, not the device's whole set. A drawn recording that
    gets no label (below ``train.pseudo_threshold``, an empty decode, or no transcript under
    ``transcripts``) is left out of its batch: its contribution is zero, which is within the clipping
    bound like any other, so the sample-level guarantee is unchanged.

    ``teacher`` builds the teacher model, called once, the first time something is pseudo-labelled;
    ``corrected_fraction``: under ``corrections``, the chance a recording with a transcript counts as
    corrected (1.0 on a deployed device: every transcript it holds is the user's). Nothing this object
    holds -- labels, scores, how many were kept -- is ever part of a reply.
    """

    def __init__(self, train: TrainConfig, recognizer: Recognizer, teacher: Callable[[], nn.Module], secret: Secret,
                 corrected_fraction: float) -> None:
        if train.labels not in LABEL_SOURCES:
            raise ValueError(f"train.labels={train.labels!r} is not one of {', '.join(LABEL_SOURCES)}")
        self.train, self.recognizer, self.secret = train, recognizer, secret
        self.corrected_fraction = corrected_fraction
        self._build_teacher = teacher
        self._teacher: Optional[nn.Module] = None
        self._made: dict[str, Optional[Example]] = {}  # recording id -> its pair (None: no label)

    def _pair(self, e: Example) -> Optional[Example]:
        labels = self.train.labels
        if labels == "transcripts" or (labels == "corrections" and e.text is not None
                                       and is_corrected(self.secret, e.id, self.corrected_fraction)):
            return e if e.text is not None else None
        if self._teacher is None:
            self._teacher = self._build_teacher()
        kept = pseudo_label(self.recognizer, self._teacher, [e], self.train.pseudo_threshold)
        return kept[0] if kept else None

    def __call__(self, examples: Sequence[Example]) -> list[Example]:
        """The labelled pairs of ``examples``, in their order, without those that get no label."""
        for e in examples:
            if e.id not in self._made:
                self._made[e.id] = self._pair(e)
        return [p for p in (self._made[e.id] for e in examples) if p is not None]

    @property
    def kept(self) -> int:
        """How many distinct recordings got a label so far in this release (stays on the device)."""
        return sum(p is not None for p in self._made.values())
