"""The Whisper recognizer: the pinned seed's conversion (against CTranslate2's own decoding), a local
Hugging Face folder (a small random Whisper saved to a temp dir), the DP recipe's per-sample
gradients, loop-proof decoding and export."""

from __future__ import annotations

import pickle
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from transformers import WhisperConfig, WhisperForConditionalGeneration

import fl.model.whisper as W
import fl.model.whisper_seed as S
from fl.config import ModelConfig, TrainConfig
from fl.data.audio import load_audio
from fl.data.features import Example, collate
from fl.model import build_recognizer
from fl.privacy.sample import per_sample_backward
from fl.train import evaluate, plain_round

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "speechocean762"


@pytest.fixture(scope="module")
def small_whisper(tmp_path_factory) -> Path:
    """A randomly initialised 2-decoder-layer Whisper with tiny.en's tokenizer, saved as a HF folder."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("small-whisper")
    config = WhisperConfig(vocab_size=51864, d_model=16, encoder_layers=1, decoder_layers=2,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                           decoder_ffn_dim=32, max_source_positions=1500, max_target_positions=64)
    WhisperForConditionalGeneration(config).save_pretrained(folder)
    shutil.copyfile(S.seed_folder() / "tokenizer.json", folder / "tokenizer.json")
    return folder


def _examples(recognizer, seconds=(1.0, 2.5, 1.5, 3.0), texts=("turn on the lights", "call mom", "play some jazz",
                                                                  "set a timer for ten minutes")) -> list[Example]:
    rng = np.random.default_rng(0)
    audio = [0.1 * rng.standard_normal(int(s * 16000)).astype(np.float32) for s in seconds]
    return [Example(f"u{i}", "s", f.half(), torch.tensor(recognizer.encode(t)), t, len(a) / 16000)
            for i, (t, a, f) in enumerate(zip(texts, audio, recognizer.features(audio)))]


def test_the_seed_converts_exactly_onto_transformers_whisper():
    """CTranslate2's tensors fill every parameter (none left over), and the pinned digest is checked."""
    seed = S.load_seed(None)
    module = WhisperForConditionalGeneration(seed.config)
    assert set(seed.state) == set(module.state_dict()) - {"proj_out.weight"}
    assert (seed.config.d_model, seed.config.encoder_layers, seed.config.decoder_layers,
            seed.config.vocab_size) == (384, 4, 4, 51864)
    assert sum(v.numel() for v in seed.state.values()) == sum(p.numel() for p in module.parameters())


def test_an_altered_seed_is_refused(monkeypatch):
    monkeypatch.setattr(S, "SEED_SHA256", "0" * 64)
    S.load_seed.cache_clear()
    try:
        with pytest.raises(S.SeedError, match="SHA-256"):
            S.load_seed(None)
    finally:
        S.load_seed.cache_clear()


@pytest.mark.skipif(not SHARED.is_dir(), reason="speechocean762 is not beside the repository")
def test_the_converted_seed_decodes_as_ctranslate2_does_on_real_speech():
    """Greedy transcripts of real utterances equal CTranslate2's own; encoder states agree closely."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    recognizer = build_recognizer(ModelConfig(kind="whisper", input_seconds=30))  # the original 30 s window
    lines = (SHARED / "dev" / "wav.scp").read_text().splitlines()[:6]
    audio = [load_audio(SHARED / line.split(maxsplit=1)[1]) for line in lines]
    mel = recognizer.log_mel(audio)
    ct2 = ctranslate2.models.Whisper(str(S.seed_folder()), device="cpu", compute_type="float32")
    features = ctranslate2.StorageView.from_array(np.ascontiguousarray(mel.numpy()))
    module = recognizer.new_module().eval()
    with torch.no_grad():
        ours = module.model.encoder(mel).last_hidden_state.numpy()
    assert np.abs(np.array(ct2.encode(features, to_cpu=True)) - ours).max() < 1e-3
    theirs = [recognizer.decode(r.sequences_ids[0])
              for r in ct2.generate(features, [recognizer.prompt] * len(audio), beam_size=1, max_length=448)]
    examples = [Example(str(i), "s", f.half(), torch.tensor([recognizer.eot]), "x", len(a) / 16000)
                for i, (f, a) in enumerate(zip(recognizer.features(audio), audio))]
    out = recognizer.transcribe(module, collate(examples))
    assert out.texts == theirs and out.loops_cut == 0
    assert any(t.strip() for t in theirs)


def test_a_local_whisper_folder_trains_only_the_presets_parameters_and_shares_only_them(small_whisper):
    recognizer = build_recognizer(ModelConfig(kind="whisper", path=str(small_whisper)))
    assert recognizer.cached_encoder  # no encoder parameter trains: its outputs are the features
    examples = _examples(recognizer)
    assert examples[0].feats.shape == (500, 16) and examples[0].tokens[-1] == recognizer.eot
    module = recognizer.new_module()
    shared = recognizer.shared(module)
    assert shared and all(k.startswith("model.decoder.") and "embed" not in k for k in shared)
    assert all(k.endswith("bias") or "layer_norm" in k for k in shared)  # the preset: biases and norms
    before = {k: v.clone() for k, v in shared.items()}
    frozen = module.model.decoder.embed_tokens.weight.clone()
    plain_round(module, recognizer, examples, TrainConfig(local_steps=2, batch_size=2, lr=1e-2), seed=0)
    after = recognizer.shared(module)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(module.model.decoder.embed_tokens.weight, frozen)
    # another party rebuilds the same model from the seed plus the shared weights alone
    again = recognizer.module_from(after)
    batch = collate(examples)
    torch.testing.assert_close(recognizer.losses(again.eval(), batch), recognizer.losses(module.eval(), batch))
    with pytest.raises(ValueError, match="do not fit"):
        recognizer.load_shared(again, {k: v for k, v in list(after.items())[1:]})


def test_a_pickled_recognizer_is_its_settings_and_rebuilds_the_same_model(small_whisper):
    recognizer = build_recognizer(ModelConfig(kind="whisper", path=str(small_whisper)))
    module = recognizer.new_module()  # the template is built: it must not travel either
    blob = pickle.dumps(recognizer)
    assert len(blob) < 10_000  # the weights stay behind (3 MB of seed here, 150 MB for tiny.en)
    restored = pickle.loads(blob)
    assert restored is pickle.loads(blob)  # one instance a process: the seed and template are built once
    assert restored.trainable == recognizer.trainable and restored.feature_key == recognizer.feature_key
    again = restored.new_module()
    for (name, a), (other, b) in zip(module.state_dict().items(), again.state_dict().items(), strict=True):
        assert name == other and torch.equal(a, b)


def test_the_loss_of_an_example_does_not_depend_on_the_batch(small_whisper):
    recognizer = build_recognizer(ModelConfig(kind="whisper", path=str(small_whisper)))
    module = recognizer.new_module().eval()
    examples = _examples(recognizer)
    together = recognizer.losses(module, collate(examples))
    alone = torch.cat([recognizer.losses(module, collate([e])) for e in examples])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_the_chunked_cross_entropy_is_the_cross_entropy_of_the_logits(monkeypatch):
    """:class:`~fl.model.whisper.TiedCrossEntropy` against float64 ``F.cross_entropy`` of the full
    logits: losses and the hidden states' gradient, with chunks that do not divide the vocabulary,
    logits large enough that an un-rescaled sum would overflow, and without a gradient asked."""
    monkeypatch.setattr(W, "OUTPUT_CHUNK", 7)
    torch.manual_seed(0)
    weight = torch.randn(50, 8)
    hidden = (torch.randn(5, 8) * torch.tensor([1.0, 5.0, 20.0, 40.0, 0.1])[:, None]).requires_grad_()
    targets = torch.tensor([0, 49, 13, 7, 21])
    upstream = torch.rand(5)
    fused = W.TiedCrossEntropy.apply(hidden, weight, targets)
    (fused * upstream).sum().backward()
    reference = hidden.detach().double().requires_grad_()
    exact = torch.nn.functional.cross_entropy(reference @ weight.double().T, targets, reduction="none")
    (exact * upstream.double()).sum().backward()
    torch.testing.assert_close(fused.detach().double(), exact.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hidden.grad.double(), reference.grad, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(W.TiedCrossEntropy.apply(hidden, weight, targets), fused.detach())
        with torch.autocast("cpu", dtype=torch.bfloat16):  # evaluation's autocast: still float32 inside
            torch.testing.assert_close(W.TiedCrossEntropy.apply(hidden, weight, targets), fused.detach())


@pytest.mark.parametrize("trainable", [None, r"^model\.decoder\.embed_tokens"])
def test_the_recognizers_loss_and_gradients_are_those_of_the_full_logits(small_whisper, trainable):
    """``losses`` (the chunked head when the tied output matrix is frozen, the logits when it trains)
    against cross-entropy on the model's own logits: the same losses and the same gradients for every
    trainable parameter -- the output matrix included when it trains."""
    recognizer = build_recognizer(ModelConfig(kind="whisper", path=str(small_whisper)), trainable)
    examples = _examples(recognizer)
    batch = collate(examples)
    model = recognizer.new_module().train()
    reference = recognizer.module_from(recognizer.shared(model)).train()
    recognizer.losses(model, batch).sum().backward()
    decoder_ids, tokens, valid = recognizer._inputs(batch)
    logits = reference(encoder_outputs=W.BaseModelOutput(last_hidden_state=batch.feats),
                       decoder_input_ids=decoder_ids, use_cache=False).logits[:, len(recognizer.prompt) - 1:]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens, reduction="none") * valid
    expected = ce.sum(dim=1) / valid.sum(dim=1)
    expected.sum().backward()
    torch.testing.assert_close(recognizer.losses(model, batch).detach(), expected.detach(), atol=1e-5, rtol=1e-5)
    ref_params = dict(reference.named_parameters())
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trained
    for name, p in trained:
        torch.testing.assert_close(p.grad, ref_params[name].grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("trainable", [None, r"^model\.decoder\.layers\.",
                                       r"^model\.decoder\.(layers\.1\.|embed_positions)"])
def test_per_sample_gradients_of_the_recipe_are_each_examples_own(small_whisper, trainable):
    """DP-SGD clips what each example alone contributes: with a full backward (the preset; a trained
    positional table) and with the leaves the recognizer names (the decoder's blocks)."""
    recognizer = build_recognizer(ModelConfig(kind="whisper", path=str(small_whisper)), trainable)
    examples = _examples(recognizer)
    torch.manual_seed(0)
    model = recognizer.new_module().train()
    reference = recognizer.module_from(recognizer.shared(model)).train()  # dropout is 0 in this config
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    per_sample_backward(gsm, recognizer, collate(examples))
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(p.grad_sample is not None for _, p in trained)
    ref_params = dict(reference.named_parameters())
    for i, e in enumerate(examples):
        reference.zero_grad()
        recognizer.losses(reference, collate([e])).sum().backward()
        for name, p in trained:
            torch.testing.assert_close(p.grad_sample[i], ref_params[name].grad, atol=1e-5, rtol=1e-3, msg=name)


def test_runaway_repetition_is_cut_back_to_one_copy():
    assert W.cut_loop([5, 6, 7, 7, 7, 7]) == [5, 6, 7]
    assert W.cut_loop([1, 2, 3, 4, 3, 4, 3, 4, 3, 4]) == [1, 2, 3, 4]
    assert W.cut_loop([1, 2, 1, 2, 1, 2]) is None  # three copies: could be speech
    assert W.cut_loop([9, 8, 7]) is None


def test_decoding_stops_at_the_length_cap_and_counts_it(small_whisper):
    """A random decoder never says end-of-text: every hypothesis runs into the cap (or a loop)."""
    recognizer = build_recognizer(ModelConfig(kind="whisper", path=str(small_whisper)))
    module = recognizer.new_module().eval()
    batch = collate(_examples(recognizer))
    out = recognizer.transcribe(module, batch)
    assert len(out.texts) == 4 and 0 <= out.loops_cut <= 4
    short = recognizer.transcribe(module, replace(batch, seconds=torch.zeros(4)))
    assert all(len(recognizer.tokenizer.encode(t, add_special_tokens=False).ids) <= 3 * W.SLACK_TOKENS
               for t in short.texts)
    result = evaluate(recognizer, module, _examples(recognizer))
    assert result.utterances == 4 and result.loops_cut >= 0 and result.raw_wer >= 0


def test_export_writes_a_folder_transformers_opens_with_the_same_weights(small_whisper, tmp_path):
    recognizer = build_recognizer(ModelConfig(kind="whisper", path=str(small_whisper)))
    module = recognizer.new_module()
    shared = {k: v + 0.01 for k, v in recognizer.shared(module).items()}
    out = recognizer.export(shared, tmp_path / "export")
    loaded = WhisperForConditionalGeneration.from_pretrained(out).eval()
    expected = recognizer.module_from(shared).eval()
    for name, value in expected.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, msg=name)
    again = build_recognizer(ModelConfig(kind="whisper", path=str(out)))  # and it is a model.path of its own
    assert again.config.max_source_positions == 500


def test_bad_settings_are_refused_with_a_reason(small_whisper, tmp_path):
    with pytest.raises(ValueError, match="input_seconds"):
        build_recognizer(ModelConfig(kind="whisper", path=str(small_whisper), input_seconds=45))
    with pytest.raises(S.SeedError, match="not a Hugging Face Whisper folder"):
        build_recognizer(ModelConfig(kind="whisper", path=str(tmp_path)))


def test_modules_share_the_frozen_seed_and_copy_only_what_trains(small_whisper):
    """A device round copies the trainable values alone: every module of a recognizer holds the same
    frozen tensors (the seed's), and training one -- plain AdamW or DP-SGD -- moves neither the
    others nor those shared tensors. (A full deep copy fails the sharing; a copy that shared a
    trainable tensor fails the independence.)"""
    from fl.privacy.randomness import Secret
    from fl.privacy.sample import SampleAccount, SampleLevel

    recognizer = build_recognizer(ModelConfig(kind="whisper", path=str(small_whisper)))
    a, b = recognizer.new_module(), recognizer.new_module()
    frozen = {n: p for n, p in a.named_parameters() if not p.requires_grad}
    trained = {n for n, p in a.named_parameters() if p.requires_grad}
    others = dict(b.named_parameters())
    assert frozen and trained
    assert all(others[n].data_ptr() == p.data_ptr() for n, p in frozen.items())
    assert all(others[n].data_ptr() != dict(a.named_parameters())[n].data_ptr() for n in trained)
    snapshot = {k: v.clone() for k, v in b.state_dict().items()}
    examples = _examples(recognizer)
    plain_round(a, recognizer, examples, TrainConfig(local_steps=2, batch_size=2, lr=1e-2), seed=0)
    SampleLevel(1.0, 1.0, 1.0, 2).train(a, recognizer, examples, TrainConfig(local_steps=2, batch_size=2, lr=1e-2),
                                        SampleAccount(), Secret(bytes(32)), 0)
    assert any(not torch.equal(p, snapshot[n]) for n, p in a.named_parameters() if n in trained)
    assert all(torch.equal(v, snapshot[k]) for k, v in b.state_dict().items())
    assert all(not p.requires_grad for p in frozen.values())
