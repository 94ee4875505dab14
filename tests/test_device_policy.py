"""The device sets its own floor (audit, issue 18, item B).

Every train request is checked against the device's own policy before anything is trained: below
its noise floor, a placement it refuses, or past one of its budgets (sample-level, and what servers
learned from its user-level releases, over every run) -> it declines with a fixed code, trains
nothing, leaves its ledgers as they were and notes why for its owner. A deployed device takes its
policy from its own flags, never from the run config; the server sends a run nonce it keeps across
a resume.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common.config import parse_config_args

import clients.client_app as client_app
from clients import device_cli
from clients.client_app import DeviceSettings, _train
from clients.device_app import ALLOW_SAMPLE_NOISE, policy_from_node_config
from clients.policy import check_mechanism
from clients.state import LEDGER, RELEASE, SERVER_LEDGER, STATUS, DeviceState, ServerAccount
from fl import protocol as P
from fl.config import DevicePolicy, FederationConfig, SamplePrivacyConfig, TrainConfig, UserPrivacyConfig
from fl.data.text import CharTokenizer
from fl.model.conformer import ConformerCTC, ConformerRecognizer
from fl.privacy.sample import SampleAccount, SampleLevel
from fl.privacy.user import UserLevel, UserRound, server_facing_epsilon
from server import aggregate, checkpoint
from server.secure_round import SecureSum
from server.server_app import ServerSettings, run_server
from tests.conftest import TINY, OneDevice, fake_examples, train_message


def _message(config: dict, server_round: int = 1, nonce: str = "n" * 32) -> tuple[Message, Context]:
    return train_message(server_round, config, nonce=nonce)

SAMPLE = SampleLevel(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.3, steps=2)
COHORT = {"central": 0, "local": 1, "distributed": 3}


def _device(policy: DevicePolicy, sample: bool = True, noise: Optional[str] = "local") -> DeviceSettings:
    return DeviceSettings(TINY, TrainConfig(local_steps=2, batch_size=4), SamplePrivacyConfig() if sample else None,
                          UserPrivacyConfig(noise=noise) if noise else None, seed=0, policy=policy)


def _config(sample_z: Optional[float] = 1.0, noise: Optional[str] = "local", user_z: float = 2.0) -> dict:
    out: dict = {}
    if sample_z is not None:
        out |= SampleLevel(sample_z, 1.0, SAMPLE.sample_rate, SAMPLE.steps).to_config()
    if noise is not None:
        out |= UserRound(user_z, 0.5, COHORT[noise]).to_config()
    return out


def _ask(settings: DeviceSettings, root: Path, config: dict, **kw) -> Message:
    return _train(settings, *_message(config, **kw), OneDevice(root, fake_examples(12)), ConformerRecognizer(TINY))


def _files(root: Path) -> dict[str, Optional[bytes]]:
    """Everything a release writes: the ledgers, the release record and the round history."""
    return {name: (root / name).read_bytes() if (root / name).exists() else None
            for name in (LEDGER, SERVER_LEDGER, RELEASE, "rounds.jsonl")}


def _refuse(*args, **kwargs):
    raise AssertionError("trained despite declining")


def _forbid_training(monkeypatch) -> None:
    """From now on any training or noising fails the test: a declined request must not get that far."""
    monkeypatch.setattr(SampleLevel, "train", _refuse)
    monkeypatch.setattr(UserRound, "privatize", _refuse)
    monkeypatch.setattr(client_app, "plain_round", _refuse)


@pytest.fixture
def nothing_trains(monkeypatch):
    _forbid_training(monkeypatch)


def _assert_declined(reply: Message, root: Path, before: dict, code: int) -> dict:
    assert P.ARRAYS not in reply.content and dict(reply.content[P.METRICS]) == {P.DECLINED: code}
    assert _files(root) == before  # no ledger, release record or round history changed
    note = json.loads((root / STATUS).read_text())
    assert note["code"] == code and note["reason"] == P.DECLINE_REASONS[code]
    return note


# ---------------------------------------------------------------------------------------------------
# Declining: floors and placements (checked from the message alone)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case,sample,noise,config,code", [
    ("sample z below the floor", True, None, _config(sample_z=0.3, noise=None), P.DECLINED_NOISE_FLOOR),
    ("user-level z = 0", False, "local", _config(sample_z=None, noise="local", user_z=0.0), P.DECLINED_NOISE_FLOOR),
    ("distributed z below the floor", False, "distributed", _config(sample_z=None, noise="distributed", user_z=0.2),
     P.DECLINED_NOISE_FLOOR),
    ("central without opting in", True, "central", _config(noise="central"), P.DECLINED_PLACEMENT),
    ("no DP at all", False, None, {}, P.DECLINED_NOISE_FLOOR),
    ("a noise share outside secure aggregation", False, "local", _config(sample_z=None, noise="distributed"),
     P.DECLINED_PLACEMENT),
    ("adaptive clipping (an un-noised clip bit) with local noise", False, "local",
     UserRound(2.0, 0.5, 1, "adaptive").to_config(), P.DECLINED_PLACEMENT),
])
def test_a_device_declines_a_request_below_its_floor(tmp_path, nothing_trains, case, sample, noise, config, code):
    settings = _device(DevicePolicy(), sample=sample, noise=noise)  # the deployed defaults
    reply = _ask(settings, tmp_path, config)
    _assert_declined(reply, tmp_path, {name: None for name in _files(tmp_path)}, code)


def test_the_check_happens_before_a_refused_request_touches_an_earlier_ledger(tmp_path, monkeypatch):
    settings = _device(DevicePolicy())
    assert P.ARRAYS in _ask(settings, tmp_path, _config()).content  # a first, acceptable round trains
    before = _files(tmp_path)
    _forbid_training(monkeypatch)
    reply = _ask(settings, tmp_path, _config(noise="central"), server_round=2)
    _assert_declined(reply, tmp_path, before, P.DECLINED_PLACEMENT)


# ---------------------------------------------------------------------------------------------------
# Declining: budgets (the device's ledgers over every run)
# ---------------------------------------------------------------------------------------------------
def test_a_device_declines_once_its_sample_level_budget_is_spent(tmp_path, monkeypatch):
    one = SAMPLE.epsilon(1)
    two = SAMPLE.account_for(2).epsilon(SAMPLE.delta)
    settings = _device(DevicePolicy(max_sample_epsilon=(one + two) / 2), noise=None)
    assert P.ARRAYS in _ask(settings, tmp_path, _config(noise=None)).content  # one round fits
    before = _files(tmp_path)
    _forbid_training(monkeypatch)
    reply = _ask(settings, tmp_path, _config(noise=None), server_round=2)
    note = _assert_declined(reply, tmp_path, before, P.DECLINED_SAMPLE_BUDGET)
    assert note["epsilon"] == pytest.approx(one) and note["max_epsilon"] == pytest.approx((one + two) / 2)


def test_the_runs_sample_budget_only_makes_the_devices_stricter(tmp_path):
    settings = DeviceSettings(TINY, TrainConfig(local_steps=2, batch_size=4), SamplePrivacyConfig(max_epsilon=1e-3),
                              None, seed=0, policy=DevicePolicy(max_sample_epsilon=None))
    reply = _ask(settings, tmp_path, _config(noise=None))
    assert dict(reply.content[P.METRICS]) == {P.DECLINED: P.DECLINED_SAMPLE_BUDGET}
    loose = DeviceSettings(TINY, TrainConfig(local_steps=2, batch_size=4), SamplePrivacyConfig(max_epsilon=1e6),
                           None, seed=0, policy=DevicePolicy(max_sample_epsilon=1e-3))
    reply = _ask(loose, tmp_path / "b", _config(noise=None))
    assert dict(reply.content[P.METRICS]) == {P.DECLINED: P.DECLINED_SAMPLE_BUDGET}


def test_the_server_facing_budget_holds_across_a_restart_and_runs(tmp_path, monkeypatch):
    z = 2.0
    one, two = server_facing_epsilon([z], 1e-5), server_facing_epsilon([z, z], 1e-5)
    policy = DevicePolicy(max_server_epsilon=(one + two) / 2)
    first = _device(policy, sample=False, noise="local")
    assert P.ARRAYS in _ask(first, tmp_path, _config(sample_z=None, user_z=z), nonce="a" * 32).content
    assert DeviceState(tmp_path).server_account().epsilon(1e-5) == pytest.approx(one)
    before = _files(tmp_path)
    # the device restarts (a new process: new settings, a new view of the same state folder), another run asks
    restarted = _device(DevicePolicy(max_server_epsilon=(one + two) / 2), sample=False, noise="local")
    _forbid_training(monkeypatch)
    reply = _ask(restarted, tmp_path, _config(sample_z=None, user_z=z), nonce="b" * 32)
    note = _assert_declined(reply, tmp_path, before, P.DECLINED_SERVER_BUDGET)
    assert note["epsilon"] == pytest.approx(one) and note["delta"] == 1e-5


def test_a_device_that_opted_in_to_weaker_settings_accepts_them(tmp_path):
    open_policy = DevicePolicy.permissive()
    for i, (sample, noise, config) in enumerate([
            (True, None, _config(sample_z=0.3, noise=None)),
            (False, "local", _config(sample_z=None, user_z=0.0)),
            (True, "central", _config(noise="central")),
            (False, None, {})]):
        reply = _ask(_device(open_policy, sample=sample, noise=noise), tmp_path / str(i), config)
        assert P.ARRAYS in reply.content, (i, dict(reply.content[P.METRICS]))
    status = DeviceState(tmp_path / "2").status()  # a central release: a clear update, counted apart
    assert status["clear_updates"] == 1 and status["server_releases"] == 0 and status["server_epsilon"] == 0.0


def test_every_declined_value_is_a_code_of_the_fixed_table():
    with pytest.raises(ValueError):
        client_app._declined(_message({})[0], 99)
    assert set(P.DECLINE_REASONS) == {1, 2, 3, 4, 5, 6, 7}
    assert P.decline_reason(2.0) == P.DECLINE_REASONS[2] and "unknown" in P.decline_reason(8)


# ---------------------------------------------------------------------------------------------------
# The server-facing ledger uses the server's own formula
# ---------------------------------------------------------------------------------------------------
def test_the_devices_server_facing_ledger_uses_the_servers_formula():
    level = UserLevel(UserPrivacyConfig(noise="local", noise_multiplier=1.5, delta=1e-6), 50, 5, "poisson", 4)
    account = ServerAccount(history=[(1.5, 1)] * 3)
    assert account.epsilon(1e-6) == pytest.approx(level.server_facing_epsilon(3))
    assert ServerAccount(history=[(1.5, 0)]).epsilon(1e-6) == 0.0  # central: counted apart, not as noise
    mixed = ServerAccount(history=[(1.0, 1), (3.0, 3)])
    assert mixed.epsilon(1e-5) == pytest.approx(server_facing_epsilon([1.0, 3.0], 1e-5))
    assert server_facing_epsilon([1.0], 1e-5) < mixed.epsilon(1e-5) < server_facing_epsilon([1.0, 1.0], 1e-5)


# ---------------------------------------------------------------------------------------------------
# A deployed device's policy: its own flags and node config, safe by default
# ---------------------------------------------------------------------------------------------------
BASE = ["--superlink", "127.0.0.1:1", "--data", "data", "--state", "state", "--root-cert", "ca.crt",
        "--auth-key", "key"]


def _node_config(args: argparse.Namespace) -> dict:
    """What the SuperNode's ClientApp reads: ``unheard-device``'s ``--node-config``, parsed as Flower parses it."""
    cmd = device_cli.supernode_command(args)
    return parse_config_args([cmd[cmd.index("--node-config") + 1]])


def test_a_deployed_device_keeps_the_safe_defaults_unless_its_operator_opts_out():
    args = device_cli.build_parser().parse_args(BASE)
    assert device_cli.policy_of(args) == DevicePolicy() == policy_from_node_config({})  # no key: the defaults
    assert policy_from_node_config(_node_config(args)) == DevicePolicy()
    assert "central" not in device_cli.policy_of(args).allowed_sample_noise  # a clear gradient sum: opt-in only
    weaker = device_cli.build_parser().parse_args(BASE + [
        "--allow-user-noise", "central,local,distributed", "--max-epsilon", "none", "--min-sample-z", "0.2",
        "--max-server-epsilon", "25", "--min-user-z", "0", "--privacy-delta", "1e-6",
        "--allow-sample-noise", "central,device"])
    expected = DevicePolicy(min_sample_z=0.2, min_user_z=0.0, allowed_user_noise=["central", "local", "distributed"],
                            allowed_sample_noise=["central", "device"], max_sample_epsilon=None,
                            max_server_epsilon=25.0, delta=1e-6)
    assert device_cli.policy_of(weaker) == expected == policy_from_node_config(_node_config(weaker))
    with pytest.raises(SystemExit):
        device_cli.build_parser().parse_args(BASE + ["--allow-user-noise", "clear"])
    with pytest.raises(ValueError):
        policy_from_node_config({"allow-user-noise": "everywhere"})


@pytest.mark.parametrize("flag,bad", [("--allow-sample-noise", "local"), ("--allow-sample-noise", "device,clear"),
                                      ("--allow-user-noise", "device")])
def test_a_placement_of_the_wrong_level_is_a_clear_error(flag, bad, capsys):
    with pytest.raises(SystemExit):
        device_cli.build_parser().parse_args(BASE + [flag, bad])
    err = capsys.readouterr().err
    assert flag in err and "not among" in err
    with pytest.raises(ValueError, match="allowed_sample_noise"):
        policy_from_node_config({"allow-sample-noise": "local"})  # a user-level placement


def test_a_deployed_device_refuses_central_sample_noise_unless_it_opts_in(tmp_path, nothing_trains):
    """DP-FedSGD with central noise sends the clipped gradient sum in clear: only an explicit opt-in accepts it."""
    central = SampleLevel(1.0, 1.0, SAMPLE.sample_rate, SAMPLE.steps, noise="central", expected_batch=8.0,
                          sum_cap=8.0)
    default = policy_from_node_config({})
    assert check_mechanism(default, central, None).code == P.DECLINED_PLACEMENT
    before = _files(tmp_path)
    _assert_declined(_ask(_device(default, noise=None), tmp_path, central.to_config()), tmp_path, before,
                     P.DECLINED_PLACEMENT)
    opted_in = policy_from_node_config({ALLOW_SAMPLE_NOISE: "device,central"})
    assert opted_in.allowed_sample_noise == ["device", "central"] and check_mechanism(opted_in, central, None) is None


def test_a_deployed_device_ignores_the_run_configs_device_policy(tmp_path, monkeypatch):
    """The launcher's config (``privacy.device``, permissive in conf/config.yaml) never sets a device's floor."""
    from omegaconf import OmegaConf

    from clients import device_app
    from fl.config import Config

    cfg = OmegaConf.structured(Config)
    cfg.data.cache_dir, cfg.model.d_model, cfg.model.layers = str(tmp_path), 32, 1
    cfg.privacy.name, cfg.privacy.sample = "sample", OmegaConf.structured(SamplePrivacyConfig)
    cfg.privacy.device = OmegaConf.structured(DevicePolicy.permissive())
    seen = {}
    monkeypatch.setattr(device_app, "make_client_app", lambda settings, *a, **k: seen.setdefault("s", settings))
    own = json.dumps(asdict(policy_from_node_config({})), sort_keys=True)
    device_app._app_for(json.dumps(OmegaConf.to_container(cfg, resolve=True)), own, None, "cpu")
    assert seen["s"].policy == DevicePolicy() != DevicePolicy.permissive()


def test_status_shows_both_ledgers_and_the_policy(tmp_path, capsys):
    settings = _device(DevicePolicy())
    assert P.ARRAYS in _ask(settings, tmp_path, _config(user_z=2.0)).content
    DeviceState(tmp_path).record_policy(asdict(DevicePolicy()))
    _ask(settings, tmp_path, _config(noise="central"), server_round=2)  # declined: placement
    assert device_cli.show_status(tmp_path) == 0
    out = capsys.readouterr().out
    sample_eps = SampleAccount(history=[(1.0, SAMPLE.sample_rate, SAMPLE.steps)]).epsilon(1e-5)
    assert f"epsilon       {sample_eps:.3f} at delta 1e-05 (pld)" in out
    assert f"server eps    {server_facing_epsilon([2.0], 1e-5):.3f} at delta 1e-05 (pld)" in out
    assert "1 noised release(s)" in out
    assert "policy        noise multiplier >= 0.5 (DP-SGD), >= 0.3 (user-level); user-level noise: local, " \
        "distributed; sample-level noise: device, distributed" in out
    assert "budgets       sample-level 10, server-facing 10 (at delta 1e-05, every run)" in out
    assert f"round 2: {P.DECLINE_REASONS[P.DECLINED_PLACEMENT]} [code {P.DECLINED_PLACEMENT}]" in out


def test_status_shows_the_sample_level_placements_even_for_an_older_record():
    opted = asdict(DevicePolicy(allowed_sample_noise=["central"]))
    assert "sample-level noise: central" in device_cli.policy_lines(opted)[0]
    older = {k: v for k, v in asdict(DevicePolicy()).items() if k != "allowed_sample_noise"}  # before the field
    assert device_cli.policy_lines(older)[0].endswith("sample-level noise: device, distributed")
    assert "sample noise device,distributed" in device_cli.policy_lines(None)[0]


# ---------------------------------------------------------------------------------------------------
# The server's run nonce: one per run, in every train message, kept across a resume
# ---------------------------------------------------------------------------------------------------
class RecordingGrid:
    """An in-process Grid of honest devices that echo what they were told; records every train config."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes, self.configs = nodes, []

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None):
        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if msg.metadata.message_type == MessageType.QUERY:
                out.append(Message(RecordDict({P.METRICS: MetricRecord({P.DEVICE_KEY: node})}), reply_to=msg))
                continue
            config = dict(msg.content[P.CONFIG])
            self.configs.append(config)
            weights = msg.content[P.ARRAYS].to_torch_state_dict()
            arrays = {k: Array(torch.zeros(v.shape).numpy()) for k, v in weights.items() if v.is_floating_point()}
            metrics = {k: v for k, v in config.items() if k.startswith(("sample-", "user-"))}
            out.append(Message(RecordDict({P.ARRAYS: ArrayRecord(arrays), P.METRICS: MetricRecord(metrics)}),
                               reply_to=msg))
        return out



def _server(tmp_path: Path, run: str, rounds: int, resume: bool = False, **kw) -> ServerSettings:
    torch.manual_seed(0)
    torch.save({"state_dict": ConformerCTC(TINY, CharTokenizer().vocab_size).state_dict()}, tmp_path / "seed.pt")
    torch.save(fake_examples(2), tmp_path / "eval.pt")
    return ServerSettings(out_dir=str(tmp_path / run), rounds=rounds, clients_per_round=3, round_timeout=5.0, seed=0,
                          model=TINY, train=TrainConfig(local_steps=2), initial_weights=str(tmp_path / "seed.pt"),
                          eval_examples=str(tmp_path / "eval.pt"), config={}, sampling="fixed", resume=resume, **kw)


def test_the_server_sends_one_run_nonce_per_run_and_keeps_it_across_a_resume(tmp_path, task_identity):
    user = UserPrivacyConfig(noise="local", noise_multiplier=2.0, clipping_norm=0.1, delta=1e-4)
    grid = RecordingGrid([1, 2, 3])
    run_server(grid, _server(tmp_path, "run", rounds=1, user=user))
    nonces = {c[P.RUN_NONCE] for c in grid.configs}
    assert len(nonces) == 1 and len(nonces.pop()) == 32
    first = grid.configs[0][P.RUN_NONCE]
    assert checkpoint.load(tmp_path / "run").nonce == first  # committed with the private state
    grid.configs.clear()
    run_server(grid, _server(tmp_path, "run", rounds=2, resume=True, user=user))  # continue the same run
    assert {c[P.RUN_NONCE] for c in grid.configs} == {first}
    other = RecordingGrid([1, 2, 3])
    run_server(other, _server(tmp_path, "other", rounds=1, user=user))  # another run from the same seed model
    assert {c[P.RUN_NONCE] for c in other.configs} != {first}


@pytest.mark.parametrize("noise", ["local", "distributed"])
def test_a_resumed_distributed_round_charges_the_interrupted_attempt_too(tmp_path, task_identity, monkeypatch, noise):
    """Devices answer a repeated distributed request with fresh noise: the server's own ledger then
    counts the attempt that may have been decoded before the interruption."""
    user = UserPrivacyConfig(noise=noise, noise_multiplier=2.0, clipping_norm=0.1, delta=1e-4)
    reference = ConformerCTC(TINY, CharTokenizer().vocab_size).state_dict()

    def decoded(grid, nodes, arrays, server_round, config, timeout, **kw) -> SecureSum:
        total = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in reference.items() if v.is_floating_point()}
        echo = UserRound.from_message(config).echo()
        return SecureSum(total, list(nodes), [], {n: dict(echo) for n in nodes}, step=1e-9)

    monkeypatch.setattr(aggregate, "secure_sum", decoded)
    run_server(RecordingGrid([1, 2, 3]), _server(tmp_path, "run", rounds=1, user=user))
    run_server(RecordingGrid([1, 2, 3]), _server(tmp_path, "run", rounds=2, resume=True, user=user))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["privacy"]["user"]["server_rounds"] == (3 if noise == "distributed" else 2)


def test_a_resumed_run_draws_its_noise_from_the_persisted_secret(tmp_path, task_identity):
    """Resume with secret randomness: the run secret is read back, not drawn anew. Every update is
    zero, so round 2's published model moved by the central noise alone: it must be exactly the
    noise of the secret kept in ``private/`` for round 2 (a lost secret would give other noise)."""
    from fl.privacy.gaussian import gaussian_noise_like
    from fl.privacy.randomness import SERVER_NOISE, Secret

    user = UserPrivacyConfig(noise="central", noise_multiplier=2.0, clipping_norm=0.1, delta=1e-4)
    fedavg = FederationConfig(server_optimizer="fedavg")  # the model moves by the noised mean itself
    run_server(RecordingGrid([1, 2, 3]), _server(tmp_path, "run", rounds=1, user=user, federation=fedavg))
    secret_file = tmp_path / "run" / checkpoint.PRIVATE / checkpoint.SECRET
    key = secret_file.read_bytes()
    run_server(RecordingGrid([1, 2, 3]), _server(tmp_path, "run", rounds=2, resume=True, user=user, federation=fedavg))
    assert secret_file.read_bytes() == key
    ckpt = [torch.load(tmp_path / "run" / "checkpoints" / f"round-{r:03d}.pt", weights_only=False)["state_dict"]
            for r in (1, 2)]
    floats = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in ckpt[0].items() if v.is_floating_point()}
    noise = gaussian_noise_like(floats, 2.0 * 0.1, Secret(key).stream(SERVER_NOISE, 2))
    for k in floats:
        assert torch.allclose(ckpt[1][k] - ckpt[0][k], (noise[k] / 3).float(), atol=1e-6), k
