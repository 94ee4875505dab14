"""The ``device`` key, ``federation.gpus_per_client`` and ``model.autocast``, checked on the CPU.

No GPU is needed (or used): CUDA's presence is monkeypatched where a test says what happens with
or without it, and a tensor subclass that reports another device stands in for a GPU tensor where
a test checks that what leaves a module comes back to the CPU. The dtype rules: autocast covers
inference (featurising with the frozen encoder, evaluation) and never a DP-SGD step, whose
per-sample gradients, clipping and noise stay float32 from the ChaCha20 stream."""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

import fl.model.whisper_seed as S
from experiments.bench import main as bench_main
from experiments.bench_steps import Placement, featurise
from experiments.simulate import CONF_DIR, backend_config
from fl.config import Config, FederationConfig, TrainConfig, register_configs, resolve_device, validate
from fl.model import build_recognizer
from fl.model.conformer import ConformerRecognizer
from fl.privacy.gaussian import gaussian_noise_like
from fl.privacy.randomness import DP_SGD_NOISE, Secret, Stream
from fl.privacy.sample import SampleAccount, SampleLevel, StreamNoiseDPOptimizer
from fl.train import evaluate, utterance_losses
from tests.conftest import TINY, fake_examples

SECRET = Secret(bytes(range(32)))


def typed(*overrides: str) -> Config:
    """``conf/config.yaml`` composed with ``overrides``, as the typed config the entry points validate."""
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["data.cache_dir=/tmp/x", *overrides])
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


@pytest.fixture
def no_cuda(monkeypatch):
    """A machine without CUDA, whatever this one has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


# -- the device key ------------------------------------------------------------------------------------
def test_auto_is_the_default_and_resolves_to_the_cpu_without_cuda(no_cuda, monkeypatch):
    cfg = typed()
    assert cfg.device == "auto" and cfg.federation.gpus_per_client == 0.0 and cfg.model.autocast == "none"
    validate(cfg)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    assert build_recognizer(TINY, device="auto").device == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the same spec on a machine with a GPU
    assert resolve_device("auto") == torch.device("cuda")


@pytest.mark.parametrize("spec", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_a_config_error(no_cuda, spec):
    cfg = typed(f"device={spec}")
    assert cfg.device == spec
    with pytest.raises(ValueError, match=f"device={spec} but CUDA is not available"):
        validate(cfg)
    with pytest.raises(ValueError, match="CUDA is not available"):
        build_recognizer(TINY, device=spec)


def test_a_cuda_index_the_machine_lacks_is_a_config_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"device=cuda:1 but this machine has 1 CUDA device\(s\)"):
        resolve_device("cuda:1")


def test_bf16_autocast_on_a_gpu_without_bfloat16_is_a_config_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    supported = {"bf16": False}
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported["bf16"])
    with pytest.raises(ValueError, match="model.autocast=bf16 but the GPU of device=cuda has no bfloat16 support"):
        validate(typed("device=cuda", "model.autocast=bf16"))
    validate(typed("device=cuda", "model.autocast=fp16"))  # fp16 needs nothing more
    supported["bf16"] = True
    validate(typed("device=cuda", "model.autocast=bf16"))


@pytest.mark.parametrize("spec", ["gpu", "CPU", "cuda:", "cuda:x", "cuda:-1", "cuda1", "cpu:0", "", " auto"])
def test_a_malformed_device_is_refused(spec):
    with pytest.raises(ValueError, match="is not one of auto, cpu, cuda, cuda:N"):
        validate(replace(typed(), device=spec))


def test_a_gpu_share_needs_a_gpu(no_cuda):
    cfg = typed("federation.gpus_per_client=0.25")
    with pytest.raises(ValueError, match=r"gpus_per_client=0.25 needs a GPU, but device=auto resolves to cpu"):
        validate(cfg)
    for share in (-0.5, 1.5):
        with pytest.raises(ValueError, match="a share of one GPU, in \\[0, 1\\]"):
            validate(replace(cfg, federation=replace(cfg.federation, gpus_per_client=share)))
    assert backend_config(FederationConfig(gpus_per_client=0.25))["client_resources"]["num_gpus"] == 0.25
    assert backend_config(FederationConfig())["client_resources"]["num_gpus"] == 0.0


def test_a_deployed_device_runs_on_its_own_hardware_whatever_the_runs_device(no_cuda):
    """The run's device is the launcher's and the server's: a CPU-only device still builds its app."""
    from clients.device_app import _app_for
    from fl import runconfig
    from fl.config import DevicePolicy

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        resolved = OmegaConf.to_container(compose(config_name="config", overrides=[
            "data.cache_dir=/tmp/x", "experiment=smoke", "device=cuda:1"]), resolve=True)
    values = runconfig.to_run_config(resolved)
    with pytest.raises(ValueError, match="CUDA is not available"):
        runconfig.from_run_config(values)  # the server's check, on this (GPU-less) machine
    cfg, _ = runconfig.from_run_config(values, hardware=False)
    assert cfg.device == "cuda:1"
    _app_for.cache_clear()
    assert _app_for(values[runconfig.CONFIG_KEY], json.dumps(asdict(DevicePolicy())), None, "auto") is not None


def test_a_deployed_device_chooses_its_own_device_and_a_missing_gpu_is_refused_before_it_joins(no_cuda, tmp_path):
    from clients import device_cli
    from clients.device_app import DEVICE, device_from_node_config

    assert device_from_node_config({}) == "auto"
    assert device_from_node_config({DEVICE: "cpu"}) == "cpu"
    with pytest.raises(ValueError, match="CUDA is not available"):
        device_from_node_config({DEVICE: "cuda"})
    with pytest.raises(SystemExit) as exit_:
        device_cli.main(["--superlink", "x:1", "--data", str(tmp_path), "--state", str(tmp_path / "s"),
                         "--root-cert", str(tmp_path / "ca"), "--auth-key", str(tmp_path / "k"), "--device", "cuda:0"])
    assert exit_.value.code == 2 and not (tmp_path / "s").exists()
    args = device_cli.build_parser().parse_args(["--superlink", "x:1", "--data", str(tmp_path), "--state",
                                                 str(tmp_path), "--root-cert", "c", "--auth-key", "k", "--device", "cpu"])
    node_config = device_cli.supernode_command(args)[device_cli.supernode_command(args).index("--node-config") + 1]
    assert f'{DEVICE}="cpu"' in node_config.split(" ")


@pytest.mark.parametrize("main", ["eval_main", "transcribe_main"])
def test_the_model_tools_take_the_device_and_refuse_cuda_without_it(no_cuda, main, tmp_path, capsys):
    import experiments.models as M

    argv = ["--device", "cuda:1", *(["seed", str(tmp_path)] if main == "eval_main" else [str(tmp_path / "a.wav")])]
    assert getattr(M, main)(argv) == 2
    assert "device=cuda:1 but CUDA is not available" in capsys.readouterr().err


def test_the_bench_says_it_measured_on_the_cpu():
    where = Placement()
    assert where.info()["device"] == "cpu" and "gpu" not in where.info()
    assert where.overrides() == ["device=cpu", "federation.gpus_per_client=0.0"]


def test_the_bench_on_a_gpu_gives_every_simulated_device_a_share_of_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert Placement("cuda").overrides() == ["device=cuda", f"federation.gpus_per_client={1 / 16}"]
    assert Placement("cuda:0", 0.25).overrides() == ["device=cuda:0", "federation.gpus_per_client=0.25"]
    assert Placement("cpu", 0.25).share == 0.0  # a share only on CUDA


def test_the_bench_refuses_a_gpu_the_machine_lacks_before_measuring(no_cuda, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["unheard-bench", "--device", "cuda", "--only", "dp_step"])
    with pytest.raises(SystemExit) as exit_:
        bench_main()
    assert exit_.value.code == 2 and "device=cuda but CUDA is not available" in capsys.readouterr().err


def test_the_featurising_rate_is_the_frozen_encoders(small_whisper, monkeypatch):
    """The figure times ``Recognizer.features`` on chunks of waveforms (a small Whisper stands in for
    the seed: the figure's arithmetic, not its value, is tested here)."""
    from fl.model.whisper import WhisperRecognizer

    calls = []
    original = WhisperRecognizer.features
    monkeypatch.setattr(WhisperRecognizer, "features", lambda self, audio: calls.append(len(audio)) or original(self, audio))
    figures = featurise(2, Placement(), chunk=3, seconds=1.0, model=_whisper_cfg(small_whisper))
    assert set(figures) == {"featurise_utterances_per_second"} and figures["featurise_utterances_per_second"] > 0
    assert calls == [3, 3, 3]  # one warm-up and two timed chunks of 3


# -- what leaves a module is on the CPU ------------------------------------------------------------------
class Elsewhere(torch.Tensor):
    """A CPU tensor that reports a GPU as its device until ``.cpu()`` returns it as a plain tensor."""

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return torch.device("cuda", 0)

    def cpu(self, *args, **kwargs) -> torch.Tensor:  # type: ignore[override]
        return self.as_subclass(torch.Tensor)


class OnGpu(nn.Module):
    """A module whose parameter and buffer report a GPU (:class:`Elsewhere`)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3).as_subclass(Elsewhere))
        self.register_buffer("steps", torch.zeros(2).as_subclass(Elsewhere))


def test_shared_weights_are_cpu_tensors(conformer):
    module = conformer.new_module()
    shared = conformer.shared(module)
    assert shared and all(v.device.type == "cpu" for v in shared.values())
    state = module.state_dict()  # on the CPU they are the module's own tensors, as before (no copy)
    assert all(v.data_ptr() == state[k].data_ptr() for k, v in shared.items())
    off = conformer.shared(OnGpu())
    assert set(off) == {"weight", "steps"}
    assert all(type(v) is torch.Tensor and v.device.type == "cpu" for v in off.values())


def test_a_whisper_recognizers_shared_weights_are_cpu_tensors(small_whisper):
    recognizer = build_recognizer(_whisper_cfg(small_whisper), device="cpu")
    assert all(v.device.type == "cpu" for v in recognizer.shared(recognizer.new_module()).values())
    off = recognizer.shared(OnGpu())
    assert set(off) == {"weight"} and type(off["weight"]) is torch.Tensor and off["weight"].device.type == "cpu"


# -- dtypes: autocast for inference only ------------------------------------------------------------------
def _conformer(autocast: str) -> tuple[ConformerRecognizer, nn.Module]:
    recognizer = ConformerRecognizer(replace(TINY, autocast=autocast))
    torch.manual_seed(0)
    return recognizer, recognizer.new_module()


@pytest.mark.parametrize("autocast, dtype", [("none", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_evaluation_runs_under_autocast(autocast, dtype, monkeypatch):
    recognizer, module = _conformer(autocast)
    seen: list[object] = []
    losses, transcribe = recognizer.losses, recognizer.transcribe

    def mode() -> object:
        return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None

    monkeypatch.setattr(recognizer, "losses", lambda m, b: (seen.append(mode()), losses(m, b))[1])
    monkeypatch.setattr(recognizer, "transcribe", lambda m, b: (seen.append(mode()), transcribe(m, b))[1])
    examples = fake_examples(4)
    evaluate(recognizer, module, examples, batch_size=2)
    utterance_losses(recognizer, module, examples, batch_size=2)
    assert len(seen) == 6 and set(seen) == {dtype}
    assert not torch.is_autocast_enabled("cpu")  # and it ends with the evaluation


def _dp_step(autocast: str, monkeypatch) -> tuple[list[torch.Tensor], list[torch.dtype], dict[str, torch.Tensor]]:
    """One DP-SGD step (q = 1: every example) of the TINY Conformer at ``model.autocast``: the
    per-sample gradient norms before and after clipping, the per-sample gradients' dtypes, the weights."""
    recognizer, module = _conformer(autocast)
    level = SampleLevel(noise_multiplier=1.0, max_grad_norm=0.5, sample_rate=1.0, steps=1)
    seen: list[torch.Tensor] = []
    dtypes: list[torch.dtype] = []
    clip = StreamNoiseDPOptimizer.clip_and_accumulate

    def spy(self: StreamNoiseDPOptimizer) -> None:
        dtypes.extend(g.dtype for g in self.grad_samples)
        norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in self.grad_samples], dim=1).norm(2, dim=1)
        seen.append(norms)
        seen.append(norms * (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0))  # Opacus' clip factor
        clip(self)
        dtypes.extend(p.summed_grad.dtype for p in self.params)

    with monkeypatch.context() as m:
        m.setattr(StreamNoiseDPOptimizer, "clip_and_accumulate", spy)
        level.train(module, recognizer, fake_examples(6), TrainConfig(batch_size=6, lr=1e-2), SampleAccount(), SECRET,
                    0)
    return seen, dtypes, recognizer.shared(module)


def test_a_dp_sgd_step_ignores_autocast_and_stays_float32(monkeypatch):
    """Under model.autocast=bf16 the step's per-sample norms (clipped and not), the clipped sums'
    dtype and the resulting weights are those of autocast=none: the step never runs under it."""
    plain, plain_dtypes, plain_weights = _dp_step("none", monkeypatch)
    cast, cast_dtypes, cast_weights = _dp_step("bf16", monkeypatch)
    assert len(plain) == 2 and plain[0].numel() == 6 and (plain[0] > 0.5).any()  # some gradients are clipped
    assert set(plain_dtypes) == set(cast_dtypes) == {torch.float32}
    for a, b in zip(plain, cast):
        assert b.dtype == torch.float32
        torch.testing.assert_close(b, a, rtol=1e-5, atol=0.0)
    for k, v in plain_weights.items():
        assert cast_weights[k].dtype == v.dtype
        torch.testing.assert_close(cast_weights[k], v, rtol=1e-5, atol=1e-7)


def test_dp_noise_comes_from_the_chacha20_stream_on_the_cpu_whatever_the_settings(monkeypatch):
    """The step's noise is the pinned secret's stream drawn on the CPU (the same values under any
    device or autocast setting), and no torch generator draws anything during the step."""
    expected = gaussian_noise_like({"a": torch.zeros(3), "b": torch.zeros(2, dtype=torch.float64)}, 0.5,
                                   SECRET.stream(DP_SGD_NOISE, 0))
    assert expected["a"].tolist() == [-0.40472257137298584, -0.3390619158744812, 0.1928202360868454]  # as before
    assert expected["b"].tolist() == [0.5276718272210661, -0.5727364742716604]  # the device key was added

    drawn: list[list[torch.Tensor]] = []
    gaussian_like = Stream.gaussian_like

    def spy(self: Stream, tensors, std, secure=False):
        out = gaussian_like(self, tensors, std, secure)
        drawn.append([t.clone() for t in out])
        return out

    def refused(*args, **kwargs):
        raise AssertionError("DP noise drawn by a torch generator")

    monkeypatch.setattr(Stream, "gaussian_like", spy)
    runs, examples = [], fake_examples(4)
    for device, autocast in (("cpu", "none"), ("auto", "bf16")):
        recognizer = build_recognizer(replace(TINY, autocast=autocast), device=device)
        torch.manual_seed(0)
        module = recognizer.new_module()
        with monkeypatch.context() as m:
            for name in ("randn", "normal", "randn_like"):
                m.setattr(torch, name, refused)
            m.setattr(torch.Tensor, "normal_", refused)
            SampleLevel(1.0, 0.5, 1.0, 1).train(module, recognizer, examples, TrainConfig(batch_size=4),
                                                SampleAccount(), SECRET, 0)
        runs.append(drawn.pop())
    params = [p for p in ConformerRecognizer(TINY).new_module().parameters() if p.requires_grad]
    reference = gaussian_like(SECRET.stream(DP_SGD_NOISE, 0), params, 0.5)
    for run in runs:
        assert len(run) == len(reference)
        assert all(a.device.type == "cpu" and torch.equal(a, b) for a, b in zip(run, reference))


# -- featurising with the frozen Whisper encoder ----------------------------------------------------------
@pytest.fixture(scope="module")
def small_whisper(tmp_path_factory):
    """A randomly initialised 1-layer Whisper with tiny.en's tokenizer (as tests/test_whisper.py's)."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("small-whisper")
    config = WhisperConfig(vocab_size=51864, d_model=16, encoder_layers=1, decoder_layers=1,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                           decoder_ffn_dim=32, max_source_positions=1500, max_target_positions=64)
    WhisperForConditionalGeneration(config).save_pretrained(folder)
    shutil.copyfile(S.seed_folder() / "tokenizer.json", folder / "tokenizer.json")
    return folder


def _whisper_cfg(folder, autocast: str = "none"):
    from fl.config import ModelConfig

    return ModelConfig(kind="whisper", path=str(folder), input_seconds=2.0, autocast=autocast)


def test_the_frozen_encoder_featurises_under_autocast_into_float32_cpu_features(small_whisper):
    rng = np.random.default_rng(0)
    audio = [0.1 * rng.standard_normal(int(s * 16000)).astype(np.float32) for s in (1.0, 1.5)]
    out = {}
    for autocast in ("none", "bf16"):
        recognizer = build_recognizer(_whisper_cfg(small_whisper, autocast), device="auto")
        assert recognizer.cached_encoder
        feats = recognizer.features(audio)  # builds the encoder
        seen = []
        recognizer._encoder.register_forward_hook(
            lambda mod, args, result: seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu")))
        assert all(torch.equal(a, b) for a, b in zip(recognizer.features(audio), feats))
        assert seen == [torch.bfloat16 if autocast == "bf16" else False]
        assert all(f.dtype == torch.float32 and f.device.type == "cpu" for f in feats)
        out[autocast] = (recognizer.feature_key, feats)
    assert out["bf16"][0] == out["none"][0] + ":bf16"  # their own cache entries
    assert not all(torch.equal(a, b) for a, b in zip(out["bf16"][1], out["none"][1]))


def test_features_made_off_the_cpu_have_their_own_cache_key(small_whisper, monkeypatch):
    """A CPU run never reads encoder features a GPU computed (other kernels, other rounding)."""
    recognizer = build_recognizer(_whisper_cfg(small_whisper), device="cpu")
    cpu_key = recognizer.feature_key
    monkeypatch.setattr(type(recognizer), "device", property(lambda self: torch.device("cuda", 0)))
    assert recognizer.feature_key == cpu_key + ":cuda"
