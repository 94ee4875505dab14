"""Secure aggregation (SecAgg+) in a real Flower simulation: the server gets the sum, not the updates.

A tiny ServerApp calls ``server.secure_round.secure_sum`` twice over 4 simulated devices whose
ClientApp (behind ``clients.secure_app``'s mods and the ordinary outbound guard) returns known,
node-specific updates. Round 1: everyone contributes. Round 2: one device fails while training
(a dropout after key sharing), and the sum of the other three is still recovered.
"""

import math
import time

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import FitIns, bytes_to_ndarray, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key
from flwr.compat.common.recorddict_compat import fitins_to_recorddict, recorddict_to_fitres
from flwr.serverapp import Grid, ServerApp

from clients.guard import OutboundViolation, allowed_metrics, outbound_guard
from clients.secure_app import check_secure_reply, fitres_adapter, secure_train_mods
from fl import protocol as P
from fl.privacy.secagg import SECURE_NAMES, clipping_range_for, quantization_range_for, quantization_step
from fl.privacy.user import WIRE_COHORT, UserRound
from server.secure_round import secure_sum

RANGE = 8.0
SHAPES = {"w": (3, 4), "b": (5,), "count": ()}
FAIL = "fail-node"
GLOBAL_W = 0.25
ALLOWED = allowed_metrics(sample=False, user=True)  # secure aggregation serves distributed user-level DP
ECHO = UserRound(1.0, 1.0, 3).echo()


def global_arrays() -> ArrayRecord:
    # "count" is an integer buffer: not part of any update (model_delta covers floats only)
    return ArrayRecord({"w": torch.full((3, 4), GLOBAL_W), "b": torch.zeros(5), "count": torch.tensor(7)})


def true_update(node: int) -> dict[str, torch.Tensor]:
    """What device ``node`` sends: deterministic, different per node, within [-RANGE, RANGE]."""
    g = torch.Generator().manual_seed(node % (2**63))
    return {"w": torch.rand(3, 4, generator=g) * 4 - 2, "b": torch.randn(5, generator=g)}


def make_client_app() -> ClientApp:
    app = ClientApp()

    @app.train(mods=secure_train_mods(SHAPES, ALLOWED) + [outbound_guard(SHAPES, ALLOWED)])
    def train(msg: Message, context: Context) -> Message:
        config = msg.content[P.CONFIG]
        if int(config.get(FAIL, -1)) == context.node_id % (2**62):
            raise RuntimeError("injected failure while training")
        weights = msg.content[P.ARRAYS].to_torch_state_dict()
        assert set(weights) == set(SHAPES) and torch.all(weights["w"] == GLOBAL_W) and int(weights["count"]) == 7
        update = {k: v + (weights[k] - GLOBAL_W if k == "w" else 0) for k, v in true_update(context.node_id).items()}
        metrics = MetricRecord(ECHO)
        return Message(RecordDict({P.ARRAYS: ArrayRecord(update), P.METRICS: metrics}), reply_to=msg)

    return app


class RecordingGrid:
    """The server's grid, recording every reply the server receives."""

    def __init__(self, grid: Grid) -> None:
        self.grid, self.received = grid, []

    def send_and_receive(self, messages, *, timeout=None):
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.received += replies
        return replies

    def __getattr__(self, name):
        return getattr(self.grid, name)


def make_server_app(out: dict) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        deadline = time.monotonic() + 30
        while len(nodes := sorted(grid.get_node_ids())) < 4 and time.monotonic() < deadline:
            time.sleep(0.2)
        recorder = RecordingGrid(grid)
        kw = dict(clipping_range=RANGE, min_contributors=3)
        out["nodes"] = nodes
        out["r1"] = secure_sum(recorder, nodes, global_arrays(), 1, {WIRE_COHORT: 3}, 120, **kw)
        out["fail"] = nodes[0]
        out["r2"] = secure_sum(recorder, nodes, global_arrays(), 2, {FAIL: nodes[0] % (2**62)}, 120, **kw)
        out["received"] = recorder.received

    return app


@pytest.fixture(scope="module")
def secure_run():
    from flwr.simulation import run_simulation

    out: dict = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
        run_simulation(server_app=make_server_app(out), client_app=make_client_app(), num_supernodes=4,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                       "init_args": {"include_dashboard": False, "num_cpus": 2}})
    assert "received" in out, "the ServerApp did not finish"
    return out


def _expected(nodes):
    return {k: sum(true_update(n)[k].to(torch.float64) for n in nodes) for k in ("w", "b")}


def test_the_server_gets_the_sum_of_the_updates_within_the_quantisation_step(secure_run):
    r1 = secure_run["r1"]
    assert sorted(r1.contributed) == secure_run["nodes"] and r1.failed == []
    assert r1.step == quantization_step(RANGE, quantization_range_for(4)) < 2e-8
    expected = _expected(r1.contributed)
    assert set(r1.total) == {"w", "b"}  # the integer buffer is not aggregated
    for k in expected:
        err = float((r1.total[k] - expected[k]).abs().max())
        assert err <= len(r1.contributed) * r1.step, (k, err)
    assert all(m == ECHO for m in r1.metrics.values())


def test_a_device_dropping_after_key_sharing_leaves_the_sum_of_the_others(secure_run):
    r2, fail = secure_run["r2"], secure_run["fail"]
    assert r2.failed == [fail] and sorted(r2.contributed) == [n for n in secure_run["nodes"] if n != fail]
    expected = _expected(r2.contributed)
    for k in expected:
        assert float((r2.total[k] - expected[k]).abs().max()) <= 3 * r2.step


def test_the_server_never_receives_an_update_in_clear(secure_run):
    q, masked_replies = quantization_range_for(4), 0
    for reply in secure_run["received"]:
        if reply.has_error():
            continue
        check_secure_reply(reply.content, SHAPES, ALLOWED)  # protocol records only; any array record is empty
        assert all(len(r) == 0 for r in reply.content.array_records.values())
        protocol = reply.content.config_records[RECORD_KEY_CONFIGS]
        if Key.MASKED_PARAMETERS not in protocol:
            continue
        masked_replies += 1
        weight, *vector = [bytes_to_ndarray(b) for b in protocol[Key.MASKED_PARAMETERS]]
        assert int(weight[0]) != q  # the clear weight would be exactly Q
        truth = true_update(reply.metadata.src_node_id)
        for name, m in zip(("w", "b"), vector):
            as_if_clear = m.astype(np.float64) * 2 * RANGE / q - RANGE  # decode the masked integers alone
            # masked, each coordinate is uniform over [-R, R]: its mean distance from the truth is
            # about R/2 = 4 (below 1 has probability under 1e-9); a clear update would sit at 0
            assert np.abs(as_if_clear - truth[name].numpy()).mean() > 1.0
    assert masked_replies == 4 + 3


def test_range_and_quantisation_helpers():
    assert quantization_range_for(4) * 4 < 2**32
    r = clipping_range_for(1.0, 0.1, numel=10**6, devices=100, failure=1e-12)
    assert 1.0 + 0.1 * 9.3 < r < 1.0 + 0.1 * 9.4  # 1e8 coordinates at 1e-12: P(|N| > k) <= 1e-20
    assert 1e8 * math.erfc((r - 1.0) / 0.1 / math.sqrt(2)) <= 1e-12
    assert clipping_range_for(2.0, 0.0, 10, 10) == 2.0


def test_the_secure_guard_refuses_clear_arrays_and_foreign_records():
    content = RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({}),
                          "fitres.parameters": ArrayRecord({"w": torch.zeros(3, 4)})})
    with pytest.raises(OutboundViolation, match="in clear"):
        check_secure_reply(content, SHAPES, ALLOWED)
    with pytest.raises(OutboundViolation, match="records"):
        check_secure_reply(RecordDict({P.ARRAYS: ArrayRecord({"w": torch.zeros(3, 4)})}), SHAPES, ALLOWED)


def test_the_secure_guard_passes_the_echo_and_refuses_other_clear_metrics():
    reply = {RECORD_KEY_CONFIGS: ConfigRecord({}), "fitres.metrics": ConfigRecord(ECHO)}
    check_secure_reply(RecordDict(reply), SHAPES, ALLOWED)
    for name in ("seconds", P.NUM_EXAMPLES, "sample-z"):
        with pytest.raises(OutboundViolation, match="may not leave"):
            check_secure_reply(RecordDict({**reply, "fitres.metrics": ConfigRecord({name: 1.0})}), SHAPES, ALLOWED)


def _collect_stage_message(noise_cohort: int, user: dict | None = None) -> tuple[Message, Context]:
    arrays = global_arrays()
    params = ndarrays_to_parameters([a.numpy() for a in arrays.values()])
    content = fitins_to_recorddict(FitIns(params, {SECURE_NAMES: list(arrays.keys()), WIRE_COHORT: noise_cohort,
                                                   P.ROUND: 1, **(user or {})}), True)
    meta = Metadata(run_id=1, message_id="m", src_node_id=0, dst_node_id=5, reply_to_message_id="", group_id="1",
                    created_at=time.time(), ttl=600.0, message_type=MessageType.TRAIN)
    msg = Message(content=content, metadata=meta)
    state = RecordDict({RECORD_KEY_STATE: ConfigRecord({"threshold": 3, "clipping_range": RANGE})})
    return msg, Context(run_id=1, node_id=5, node_config={}, state=state, run_config={})


def test_the_adapter_hands_train_named_arrays_and_returns_an_unweighted_fitres():
    msg, context = _collect_stage_message(3)
    seen = {}

    def train(m: Message, c: Context) -> Message:
        seen.update(m.content[P.ARRAYS].to_torch_state_dict())
        seen["config"] = dict(m.content[P.CONFIG])
        update = {"b": torch.ones(5), "w": torch.full((3, 4), 2.0)}  # any order: the adapter orders it
        return Message(RecordDict({P.ARRAYS: ArrayRecord(update), P.METRICS: MetricRecord(ECHO)}),
                       reply_to=m)

    reply = fitres_adapter(msg, context, train)
    assert torch.all(seen["w"] == GLOBAL_W) and int(seen["count"]) == 7 and seen["config"][WIRE_COHORT] == 3
    fitres = recorddict_to_fitres(reply.content, True)
    w, b = parameters_to_ndarrays(fitres.parameters)
    assert fitres.num_examples == 1 and fitres.metrics == ECHO
    assert w.dtype == np.float64 and np.all(w == 2.0) and np.all(b == 1.0)


def test_the_adapter_refuses_a_noise_cohort_above_the_secagg_threshold():
    msg, context = _collect_stage_message(4)
    with pytest.raises(OutboundViolation, match="exceeds the SecAgg"):
        fitres_adapter(msg, context, lambda m, c: pytest.fail("train must not run"))


def test_the_adapter_refuses_a_secagg_range_that_would_clip_its_noise_share():
    """SecAgg+ clips every coordinate to the server's ``clipping_range`` before masking: a range
    below a clipped, noised update's needs would cut the device's noise share, so it does not
    contribute; a range that fits the share passes to training."""
    tight = UserRound(noise_multiplier=4.0, clip_norm=1.0, noise_cohort=3).to_config()  # share std 2.3: needs ~18
    msg, context = _collect_stage_message(3, tight)
    assert clipping_range_for(1.0, 4.0 / 3**0.5, 17, 1) > RANGE
    with pytest.raises(OutboundViolation, match="range"):
        fitres_adapter(msg, context, lambda m, c: pytest.fail("train must not run"))
    fits = UserRound(noise_multiplier=0.5, clip_norm=1.0, noise_cohort=3).to_config()
    msg, context = _collect_stage_message(3, fits)
    trained = []

    def train(m: Message, c: Context) -> Message:
        trained.append(m)
        return Message(RecordDict({P.ARRAYS: ArrayRecord({"b": torch.zeros(5), "w": torch.zeros(3, 4)}),
                                   P.METRICS: MetricRecord(fits)}), reply_to=m)

    fitres_adapter(msg, context, train)
    assert trained


def test_a_stale_message_of_an_older_round_is_refused_before_it_resets_the_protocol():
    from clients.secure_app import stale_round_guard

    msg, context = _collect_stage_message(3)  # group id "1": round 1
    msg.content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord({Key.STAGE: "setup"})
    context.state.config_records["secure-latest-round"] = ConfigRecord({"round": 2})
    with pytest.raises(RuntimeError, match="stale"):
        stale_round_guard(msg, context, lambda m, c: pytest.fail("secaggplus_mod must not see it"))
    context.state.config_records["secure-latest-round"] = ConfigRecord({"round": 1})
    assert stale_round_guard(msg, context, lambda m, c: "passed") == "passed"


def test_masks_are_keyed_by_the_whole_seed_and_installed_on_both_sides():
    import importlib

    import numpy as np

    from fl.privacy.masks import chacha_masks

    a = chacha_masks(bytes(32), 2**32, [(3, 4), ()])
    assert a[0].shape == (3, 4) and a[1].shape == () and a[0].dtype == np.int64
    assert np.array_equal(a[0], chacha_masks(bytes(32), 2**32, [(3, 4), ()])[0])
    # two seeds that Flower's XOR-fold maps to the same 32-bit seed give unrelated masks here
    folded_twin = bytes([1, 0, 0, 0, 1, 0, 0, 0]) + bytes(24)
    assert not np.array_equal(a[0], chacha_masks(folded_twin, 2**32, [(3, 4), ()])[0])
    assert int(a[0].max()) <= 2**32 - 2 and int(a[0].min()) >= 0
    for name in ("flwr.client.mod.secure_aggregation.secaggplus_mod",
                 "flwr.server.workflow.secure_aggregation.secaggplus_workflow"):
        assert importlib.import_module(name).pseudo_rand_gen is chacha_masks


def test_a_failure_under_secagg_leaves_as_a_fixed_code_only():
    """An exception below the secure mods (the inner guard's error, the adapter's, the protocol's)
    reaches the server as a code of ``fl.protocol.DEVICE_ERRORS`` with its fixed text, nothing else."""
    from flwr.common.serde import message_to_proto

    from clients.secure_app import secure_outbound_guard

    secret = "/home/alice/rec/clip7.wav: 'call my mother'"
    inner = outbound_guard(SHAPES, ALLOWED)

    def train(m: Message, c: Context) -> Message:
        raise OSError(secret)

    outer = secure_outbound_guard(SHAPES, ALLOWED)
    for below, code in ((lambda m, c: fitres_adapter(m, c, lambda m2, c2: inner(m2, c2, train)), P.ERROR_TRAINING),
                        (lambda m, c: fitres_adapter(m, c, lambda m2, c2: Message(RecordDict(
                            {P.METRICS: MetricRecord({P.DECLINED: 1})}), reply_to=m2)), P.ERROR_SECURE_LEFT),
                        (lambda m, c: (_ for _ in ()).throw(ValueError(secret)), P.ERROR_TRAINING)):
        msg, context = _collect_stage_message(3)
        reply = outer(msg, context, below)
        assert reply.has_error() and reply.error.code == code and reply.error.reason == P.DEVICE_ERRORS[code]
        wire = message_to_proto(reply).SerializeToString()
        assert b"alice" not in wire and b"mother" not in wire and b"clip7" not in wire


def test_the_adapter_checks_a_dp_fedsgd_share_like_a_user_level_one():
    """Sample-level distributed noise: a noise cohort above the threshold, or a range that would clip
    the share, is refused before training; a share that fits trains. The server runs such a round
    under SecAgg+ (``Mechanisms.secure``)."""
    from fl.config import SamplePrivacyConfig
    from fl.privacy.randomness import Secret
    from fl.privacy.sample import SampleLevel
    from server.aggregate import Mechanisms

    def share(z: float, cohort: int) -> dict:
        return SampleLevel(z, 1.0, 0.5, 1, noise="distributed", expected_batch=4.0, sum_cap=0.5,
                           noise_cohort=cohort).to_config()

    msg, context = _collect_stage_message(0, share(0.1, 4))
    with pytest.raises(OutboundViolation, match="exceeds the SecAgg"):
        fitres_adapter(msg, context, lambda m, c: pytest.fail("train must not run"))
    msg, context = _collect_stage_message(0, share(5.0, 3))
    with pytest.raises(OutboundViolation, match="range"):
        fitres_adapter(msg, context, lambda m, c: pytest.fail("train must not run"))
    fits = share(0.1, 3)
    msg, context = _collect_stage_message(0, fits)
    trained = []

    def train(m: Message, c: Context) -> Message:
        trained.append(m)
        return Message(RecordDict({P.ARRAYS: ArrayRecord({"b": torch.zeros(5), "w": torch.zeros(3, 4)}),
                                   P.METRICS: MetricRecord(fits)}), reply_to=m)

    fitres_adapter(msg, context, train)
    assert trained
    level = SampleLevel.from_message(fits, SamplePrivacyConfig())
    assert Mechanisms(level, None, Secret(bytes(32))).secure
    assert not Mechanisms(SampleLevel(1.0, 1.0, 0.5, 1), None, Secret(bytes(32))).secure
