"""Privacy and robustness checks written as the attacker: each test gives the attacker exactly what
that party holds and shows that the attack fails -- and, where the attack itself could be wrong,
that the same attack succeeds when the secret it lacks is made public (``privacy.reproducible``).

Parties: a *results reader* holds the config, ``results.jsonl``, ``summary.json`` and the published
checkpoints; the *server* also holds every reply, the device keys, and its private state; a
*malicious device* can send anything.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Optional

import dp_accounting
import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict

from clients.client_app import DeviceSettings, _train
from fl import protocol as P
from fl.config import DevicePolicy, SamplePrivacyConfig, TrainConfig, UserPrivacyConfig
from fl.data.text import CharTokenizer
from fl.model.conformer import ConformerCTC, ConformerRecognizer
from fl.privacy.accounting import UserLevelSpec, composed_epsilon
from fl.privacy.gaussian import gaussian_noise_like, update_norm
from fl.privacy.randomness import DP_SGD_NOISE, SERVER_NOISE, USER_NOISE, Secret
from fl.privacy.sample import SampleLevel
from fl.privacy.user import UserLevel, UserRound
from server import aggregate
from server.secure_round import SecureSum
from server.server_app import ServerSettings, run_server
from tests.conftest import TINY, OneDevice, fake_examples, train_message

SEED = 0


# ---------------------------------------------------------------------------------------------------
# What an attacker can regenerate: every non-cryptographic generator torch and numpy offer, seeded
# with anything public (the config, the round, the device key) or with any part of a stream key.
# ---------------------------------------------------------------------------------------------------
NUMPY_FAMILIES = ("MT19937", "PCG64", "PCG64DXSM", "Philox", "SFC64")


class Seeded:
    """A generator of one family seeded with ``seed``, drawing Gaussians the way the code would."""

    def __init__(self, family: str, seed: int) -> None:
        self.family, self.seed = family, seed

    def gaussian_like(self, tensors, std, secure=False) -> list[torch.Tensor]:
        """One generator for all tensors, drawn in order (as the pre-ChaCha code consumed its generator)."""
        if self.family.startswith("torch"):
            g = torch.Generator().manual_seed(self.seed)
            draw = lambda shape: torch.normal(0.0, std, shape, generator=g,  # noqa: E731
                                              dtype=torch.float64 if self.family == "torch64" else torch.float32)
        elif self.family == "RandomState":
            rs = np.random.RandomState(self.seed % 2**32)
            draw = lambda shape: torch.from_numpy(rs.normal(0.0, std, shape))  # noqa: E731
        else:
            gen = np.random.Generator(getattr(np.random, self.family)(self.seed))
            draw = lambda shape: torch.from_numpy(gen.normal(0.0, std, shape))  # noqa: E731
        return [draw(tuple(t.shape)).to(t.dtype) for t in tensors]

    def gaussian(self, shape, std, dtype=torch.float32, device="cpu", secure=False) -> torch.Tensor:
        return self.gaussian_like([torch.empty(tuple(shape), dtype=dtype)], std, secure)[0]


FAMILIES = ("torch", "torch64", "RandomState", *NUMPY_FAMILIES)


def key_seeds(key: bytes) -> list[int]:
    """Every seed an implementation could have taken from a stream key: each 4- and 8-byte window in
    both byte orders, and the whole key (reduced to 32 and 64 bits)."""
    seeds = {int.from_bytes(key, "big") % 2**32, int.from_bytes(key, "big") % 2**64}
    for width in (4, 8):
        for i in range(len(key) - width + 1):
            seeds |= {int.from_bytes(key[i:i + width], order) for order in ("big", "little")}
    return sorted(seeds)


def _public_generators(purpose: str, seed: int, key: Optional[int], server_round: int) -> list:
    """Streams seeded with values anyone holding the config knows: b1a9959's schemes and the
    reproducible derivation for release indices 0..3 (the positive control), each as every family."""
    candidates = [seed, seed + 7919, seed * 1_000_003 + server_round * 1009 + (key or 0) % 1_000_003]
    gens: list = [Seeded(family, c) for c in candidates for family in FAMILIES]
    owner = "server" if key is None else f"device:{key}"
    gens += [Secret.from_seed(seed, owner).stream(purpose, i) for i in (server_round, 0, 1, 2, 3)]
    return gens


def search_seeds(observed: torch.Tensor, std: float, bits: int, extra: list[int] = ()) -> list[tuple[str, int]]:
    """Every (family, seed) whose Gaussians start like ``observed``: torch's generator over all
    2**bits seeds drawing float32 (as the pre-ChaCha code did) and over 2**(bits - 4) drawing
    float64, numpy's families over 2**(bits - 6) (2**(bits - 8) for the slow Mersenne Twisters),
    and ``extra`` seeds in every family. A draw of 16 values (torch's vectorised size) matching to
    1e-4 relative is a regenerated noise stream."""
    target = observed.flatten()[:16].double()
    first, tol = float(target[0]), 1e-4 * abs(float(target[0])) + 1e-6 * std
    hits = []

    def match(candidate: torch.Tensor) -> bool:
        return abs(float(candidate[0]) - first) <= tol and bool(
            torch.allclose(candidate.double(), target, rtol=1e-4, atol=1e-6 * std))

    g = torch.Generator()
    for dtype, name, count in ((torch.float32, "torch", 2**bits), (torch.float64, "torch64", 2 ** (bits - 4))):
        for s in range(count):
            g.manual_seed(s)
            if match(torch.normal(0.0, std, (16,), generator=g, dtype=dtype)):
                hits.append((name, s))
    for family in ("RandomState", *NUMPY_FAMILIES):
        seeds = range(2 ** (bits - (8 if family in ("RandomState", "MT19937") else 6)))
        hits += [(family, s) for s in seeds if match(Seeded(family, s).gaussian((16,), std, torch.float64))]
    for family in FAMILIES:
        hits += [(family, s) for s in extra if match(Seeded(family, s).gaussian((16,), std, torch.float64))]
    return hits


def test_a_seed_search_finds_torch_seeded_noise_but_never_a_secret_stream():
    """The attack of the audit, scaled down: 2**20 torch seeds (of 2**32: torch keeps 32 bits of a
    seed) and every numpy family. It recovers the noise of a torch generator seeded with 64 bits whose
    low bits are in range -- what the pre-ChaCha code drew -- and nothing of the secret stream,
    not even with every seed that any part of the stream's key could give."""
    cfg = UserPrivacyConfig(noise="central", noise_multiplier=2.0, clipping_norm=1.0)
    user = UserLevel(cfg, devices=4, expected_cohort=4, sampling="fixed", planned_rounds=2)
    secret = Secret(bytes(range(32)))  # pinned: the test is deterministic
    release = user.aggregate([], {"w": torch.zeros(64)}, [], secret, server_round=1)["w"] * 4
    std = 2.0
    old_seed = (0x9E3779B9 << 32) | 0xBEEF  # 64 bits, low 32 bits in the searched range
    old = torch.normal(0.0, std, (64,), generator=torch.Generator().manual_seed(old_seed))
    assert ("torch", 0xBEEF) in search_seeds(old, std, bits=20)  # positive control: the attack works
    key = secret.stream_key(SERVER_NOISE, 1)
    assert search_seeds(release, std, bits=20, extra=key_seeds(key)) == []


def _reply(settings: DeviceSettings, store: OneDevice, config: dict, server_round: int = 1) -> dict[str, torch.Tensor]:
    reply = _train(settings, *train_message(server_round, config), store, ConformerRecognizer(TINY))
    return reply.content[P.ARRAYS].to_torch_state_dict()


# ---------------------------------------------------------------------------------------------------
# 1. The central noise of a published round cannot be regenerated by a results reader.
# ---------------------------------------------------------------------------------------------------
def test_a_results_reader_cannot_regenerate_the_central_noise_unless_the_run_was_reproducible():
    cfg = UserPrivacyConfig(noise="central", noise_multiplier=2.0, clipping_norm=1.0)
    reference = {"w": torch.zeros(20_000)}

    def released(secret: Secret) -> torch.Tensor:
        # a round where no update arrived: the published model moved by noise alone (sum = 0)
        user = UserLevel(cfg, devices=4, expected_cohort=4, sampling="fixed", planned_rounds=2)
        return user.aggregate([], reference, [], secret, server_round=1)["w"] * 4  # the reader knows the cohort

    def residual(release: torch.Tensor) -> float:
        """Smallest norm left after subtracting any noise the reader can regenerate (0 = noise removed)."""
        # the server draws the noise on its float64 sum; the reader draws it the same way
        noise = {"w": release.double()}
        return min(float(torch.linalg.vector_norm(release - gaussian_noise_like(noise, 2.0, g)["w"]))
                   for g in _public_generators(SERVER_NOISE, SEED, None, 1))

    secret_release = released(Secret.generate())
    assert residual(secret_release) > 0.9 * float(torch.linalg.vector_norm(secret_release))  # the noise stands
    assert residual(released(Secret.from_seed(SEED, "server"))) < 1e-3  # the same attack on a reproducible run


def test_a_reader_of_a_real_run_cannot_remove_its_central_noise(private_run):
    """``private_run`` (privacy=both, central noise) lost every training reply: each published round
    is (0 + noise) / cohort, so a reader who regenerated the noise would see the difference vanish."""
    ckpt = [torch.load(private_run / "checkpoints" / f"round-{r:03d}.pt", weights_only=False)["state_dict"]
            for r in (0, 1)]
    summary = json.loads((private_run / "summary.json").read_text())
    assert summary["privacy"]["randomness"] == "secret"
    user = summary["privacy"]["user"]
    cohort, std = summary["config"]["federation"]["clients_per_round"], user["update_noise_multiplier"] * user[
        "clipping_norm"]
    names = [k for k, v in ckpt[0].items() if v.is_floating_point()]
    release = {k: (ckpt[1][k] - ckpt[0][k]).double() * cohort for k in names}
    noise_norm = update_norm(release)
    assert noise_norm > 10 * user["clipping_norm"]  # what is there is noise, far above any signal
    for g in _public_generators(SERVER_NOISE, summary["config"]["seed"], None, 1):
        guess = gaussian_noise_like(release, std, g)  # drawn like the server's, on the float64 sum
        left = update_norm({k: release[k] - guess[k] for k in names})
        assert left > 0.9 * noise_norm  # no public seed explains it


# ---------------------------------------------------------------------------------------------------
# 2. The server cannot regenerate a device's local noise share, nor recompute its DP-SGD reply.
# ---------------------------------------------------------------------------------------------------
LOCAL = UserRound(noise_multiplier=1.0, clip_norm=0.5, noise_cohort=1)


@pytest.mark.parametrize("reproducible", [False, True])
def test_the_server_cannot_strip_a_devices_local_noise_share(tmp_path, reproducible):
    settings = DeviceSettings(TINY, TrainConfig(local_steps=2, batch_size=4), None, UserPrivacyConfig(noise="local"),
                              seed=SEED, reproducible=reproducible)
    store = OneDevice(tmp_path, fake_examples(12))
    update = _reply(settings, store, LOCAL.to_config())
    # the server's best guess: the reply minus a regenerated share is the clipped update (norm <= C)
    guesses = [gaussian_noise_like(update, LOCAL.device_std, g) for g in _public_generators(USER_NOISE, SEED,
                                                                                            store.key_, 1)]
    best = min(update_norm({k: update[k] - guess[k] for k in update}) for guess in guesses)
    if reproducible:
        assert best <= LOCAL.clip_norm  # the share comes off: reproducible noise protects against no one
    else:
        assert best > 10 * LOCAL.clip_norm  # with the device's secret, nothing the server knows removes it


@pytest.mark.parametrize("reproducible", [False, True])
def test_the_server_cannot_recompute_a_dp_sgd_reply_even_holding_the_devices_recordings(tmp_path, reproducible):
    """A perfect membership test needs the device's streams: holding its data (worst case), the
    model and the config, the server recomputes the reply with every stream it can derive."""
    mechanism = SampleLevel(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.3, steps=2)
    settings = DeviceSettings(TINY, TrainConfig(local_steps=2, batch_size=4), SamplePrivacyConfig(), None, seed=SEED,
                              reproducible=reproducible)
    data = fake_examples(12)
    real = _reply(settings, OneDevice(tmp_path / "device", data), mechanism.to_config())
    # the attacker's recomputation: the same code, the same data, the streams it can derive from the config
    attacker = DeviceSettings(TINY, settings.train, SamplePrivacyConfig(), None, seed=SEED, reproducible=True)
    guess = _reply(attacker, OneDevice(tmp_path / "attacker", data), mechanism.to_config())
    same = all(torch.equal(real[k], guess[k]) for k in real)
    assert same == reproducible


# ---------------------------------------------------------------------------------------------------
# 3. What is released carries the noise that is accounted, and the two levels' noises are independent.
# ---------------------------------------------------------------------------------------------------
def test_local_noise_implied_by_a_release_is_the_calibrated_noise_the_epsilon_is_computed_with(tmp_path):
    cfg = UserPrivacyConfig(noise="local", target_epsilon=1.0, clipping_norm=0.1)
    user = UserLevel(cfg, devices=20, expected_cohort=5, sampling="poisson", planned_rounds=4)
    assert user.z > 1.2  # calibrated: the configured 1.0 would overshoot the target
    assert user.epsilon(extra_rounds=4) <= 1.0
    settings = DeviceSettings(TINY, TrainConfig(local_steps=2), None, cfg, seed=SEED)
    update = _reply(settings, OneDevice(tmp_path, []), user.round().to_config())  # no data: the update is noise
    values = torch.cat([v.flatten() for v in update.values()])
    implied = float(values.std()) / cfg.clipping_norm
    assert implied == pytest.approx(user.z, rel=0.05)
    spec = UserLevelSpec(implied, user.rate, 4, user.delta, "poisson", "pld")
    assert composed_epsilon([spec]) == pytest.approx(1.0, rel=0.1)


def test_user_level_noise_and_dp_sgd_noise_are_independent_draws():
    secret = Secret.generate()
    reference = torch.empty(200_000)
    for release in range(3):
        user = gaussian_noise_like({"w": reference}, 1.0, secret.stream(USER_NOISE, release))["w"]
        dpsgd = secret.stream(DP_SGD_NOISE, release).gaussian(reference.shape, 1.0)
        corr = float(torch.corrcoef(torch.stack([user, dpsgd]))[0, 1])
        assert abs(corr) < 0.01


@pytest.mark.parametrize("sample,noise", [(s, n) for s in (False, True) for n in (None, "central", "local",
                                                                                    "distributed")
                                          if s or n])
def test_secure_mode_trains_in_every_combination(tmp_path, sample, noise):
    mechanism = SampleLevel(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.3, steps=2, secure_mode=True)
    user_cfg = UserPrivacyConfig(noise=noise, secure_mode=True) if noise else None
    cohort = {"central": 0, "local": 1, "distributed": 3}.get(noise or "", 0)
    config = (mechanism.to_config() if sample else {}) | (UserRound(1.0, 1.0, cohort).to_config() if noise else {})
    settings = DeviceSettings(TINY, TrainConfig(local_steps=2, batch_size=4),
                              SamplePrivacyConfig(secure_mode=True) if sample else None, user_cfg, seed=SEED,
                              policy=DevicePolicy.permissive())  # central included: a device that opted in
    reply = _train(settings, *train_message(1, config), OneDevice(tmp_path, fake_examples(8)),
                   ConformerRecognizer(TINY))
    assert P.ARRAYS in reply.content
    metrics = dict(reply.content[P.METRICS])
    if sample:
        mechanism.check_echo(metrics)
    if noise:
        UserRound(1.0, 1.0, cohort).check_echo(metrics)


# ---------------------------------------------------------------------------------------------------
# 4. A resumed run composes the rounds it really ran, whatever the population is now.
# ---------------------------------------------------------------------------------------------------
def test_resuming_with_another_population_reports_the_composed_epsilon():
    cfg = UserPrivacyConfig(noise_multiplier=1.0, delta=1e-4)
    before = UserLevel(cfg, devices=20, expected_cohort=10, sampling="poisson", planned_rounds=4)
    before.record_round()
    before.record_round()
    after = UserLevel(cfg, devices=100, expected_cohort=10, sampling="poisson", planned_rounds=4)  # 80 more joined
    after.load_state_dict(before.state_dict())
    after.record_round()
    pld = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    pld.compose(dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(1.0)), 2)
    pld.compose(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.0)), 1)
    assert after.epsilon() == pytest.approx(pld.get_epsilon(1e-4), rel=0.02)
    as_if_always_100 = UserLevel(cfg, devices=100, expected_cohort=10, sampling="poisson", planned_rounds=4)
    for _ in range(3):
        as_if_always_100.record_round()
    assert after.epsilon() > 2 * as_if_always_100.epsilon()  # what a re-accounting at the new q would understate


# ---------------------------------------------------------------------------------------------------
# 5. Malicious devices: every bad reply is dropped with a reason, and the run finishes.
# ---------------------------------------------------------------------------------------------------
Handler = Callable[[Message], Optional[Message]]


class FakeGrid:
    """An in-process Grid: node ``n``'s handler answers every message sent to it (None = no reply)."""

    def __init__(self, handlers: dict[int, Handler]) -> None:
        self.handlers = handlers

    def get_node_ids(self) -> list[int]:
        return sorted(self.handlers)

    def send_and_receive(self, messages, timeout=None):
        replies = [self.handlers[m.metadata.dst_node_id](m) for m in messages]
        return [r for r in replies if r is not None]



def _honest(scale: float, corrupt: Optional[Callable[[dict, dict], None]] = None) -> Handler:
    """A device sending a small update and the echo of what it was told (``corrupt`` edits arrays/metrics)."""

    def handle(msg: Message) -> Message:
        if msg.metadata.message_type == MessageType.QUERY:
            return Message(RecordDict({P.METRICS: MetricRecord({P.DEVICE_KEY: msg.metadata.dst_node_id})}),
                           reply_to=msg)
        config = dict(msg.content[P.CONFIG])
        g = torch.Generator().manual_seed(msg.metadata.dst_node_id)
        arrays = {k: torch.randn(v.shape, generator=g) * scale
                  for k, v in msg.content[P.ARRAYS].to_torch_state_dict().items() if v.is_floating_point()}
        metrics = {k: v for k, v in config.items() if k.startswith(("sample-", "user-"))} | {P.NUM_EXAMPLES: 10}
        if corrupt:
            corrupt(arrays, metrics)
        return Message(RecordDict({P.ARRAYS: ArrayRecord({k: Array(v.numpy()) for k, v in arrays.items()}),
                                   P.METRICS: MetricRecord(metrics)}), reply_to=msg)

    return handle


def _set(name: str, value) -> Callable[[dict, dict], None]:
    def edit(arrays: dict, metrics: dict) -> None:
        first = next(iter(arrays))
        if name == "nan":
            arrays[first].view(-1)[0] = math.nan
        elif name == "inf":
            arrays[first].view(-1)[0] = math.inf
        elif name == "huge":
            for k in arrays:
                arrays[k] *= 1e6
        elif name == "shape":
            arrays[first] = arrays[first].reshape(-1)[:1]  # would broadcast onto the model's array
        elif name == "missing":
            del arrays[first]
        elif name == "dtype":
            arrays[first] = arrays[first].double()
        else:
            metrics[name] = value

    return edit


def _settings(tmp_path: Path, **kw) -> ServerSettings:
    torch.manual_seed(0)
    model = ConformerCTC(TINY, CharTokenizer().vocab_size)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "seed.pt")
    torch.save(fake_examples(4), tmp_path / "eval.pt")
    return ServerSettings(out_dir=str(tmp_path / "run"), rounds=2, clients_per_round=len(kw.pop("nodes")),
                          round_timeout=5.0, seed=SEED, model=TINY, train=TrainConfig(local_steps=2, lr=1e-3),
                          initial_weights=str(tmp_path / "seed.pt"), eval_examples=str(tmp_path / "eval.pt"),
                          config={}, sampling="fixed", **kw)


def _final(tmp_path: Path) -> dict[str, torch.Tensor]:
    return torch.load(tmp_path / "run" / "checkpoints" / "round-002.pt", weights_only=False)["state_dict"]


def test_malicious_replies_are_dropped_and_the_private_run_finishes(tmp_path, task_identity):
    bad = {"nan": None, "inf": None, "shape": None, "missing": None, "dtype": None, "user-z": 0.0}
    handlers: dict[int, Handler] = {1: _honest(1e-3), 2: _honest(1e-3)}
    handlers |= {10 + i: _honest(1e-3, _set(name, value)) for i, (name, value) in enumerate(bad.items())}
    handlers[20] = _honest(1e-3, _set("huge", None))  # re-clipped to C: accepted, and bounded
    handlers[21] = lambda msg: None if msg.metadata.message_type == MessageType.TRAIN else _honest(0)(msg)  # silent
    user = UserPrivacyConfig(noise="central", noise_multiplier=1e-6, clipping_norm=0.01, delta=1e-4)
    s = _settings(tmp_path, nodes=handlers, user=user)
    rows = run_server(FakeGrid(handlers), s)
    assert [r.round for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert (row.clients, row.rejected, row.failures) == (3, len(bad), 1)
    start = torch.load(s.initial_weights, weights_only=False)["state_dict"]
    moved = update_norm({k: _final(tmp_path)[k] - start[k] for k in start if start[k].is_floating_point()})
    assert moved <= 2 * 3 * 0.01 / len(handlers) * 1.001 + 1e-6  # at most C per device per round, / expected cohort


def test_absurd_example_counts_and_impossible_norms_are_dropped_without_privacy(tmp_path, task_identity):
    handlers: dict[int, Handler] = {1: _honest(1e-4), 2: _honest(1e-4)}
    handlers |= {10 + i: _honest(1e-4, _set(P.NUM_EXAMPLES, n)) for i, n in enumerate((0, -3, 1e12, 2.5))}
    handlers[20] = _honest(1e-4, _set("huge", None))  # no AdamW run of 2 steps at lr 1e-3 moves weights that far
    rows = run_server(FakeGrid(handlers), _settings(tmp_path, nodes=handlers))
    assert [(r.clients, r.rejected) for r in rows[1:]] == [(2, 5), (2, 5)]
    assert all(torch.isfinite(v).all() for v in _final(tmp_path).values())


def test_a_corrupted_secure_sum_releases_nothing_and_is_still_accounted(tmp_path, task_identity, monkeypatch):
    user = UserPrivacyConfig(noise="distributed", noise_multiplier=1.0, clipping_norm=0.1, delta=1e-4)
    handlers = {n: _honest(0) for n in (1, 2, 3)}
    s = _settings(tmp_path, nodes=handlers, user=user)
    reference = ConformerCTC(TINY, CharTokenizer().vocab_size).state_dict()

    def corrupted(grid, nodes, arrays, server_round, config, timeout, **kw) -> SecureSum:
        total = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in reference.items() if v.is_floating_point()}
        first = next(iter(total))
        total[first].view(-1)[0] = math.inf if server_round == 1 else 1e9  # an inf, then a shifted coordinate
        echo = UserRound.from_message(config).echo()
        return SecureSum(total, list(nodes), [], {n: dict(echo) for n in nodes}, step=1e-9)

    monkeypatch.setattr(aggregate, "secure_sum", corrupted)
    rows = run_server(FakeGrid(handlers), s)
    assert [(r.clients, r.rejected) for r in rows[1:]] == [(0, 3), (0, 3)]
    start = torch.load(s.initial_weights, weights_only=False)["state_dict"]
    assert all(torch.equal(_final(tmp_path)[k], start[k]) for k in start)  # nothing released
    assert rows[-1].epsilon_user > rows[1].epsilon_user > 0  # ... and both rounds are accounted
