"""The Flower ClientApp: what runs on a device.

On ``train`` the device loads the global weights and fine-tunes them on its own recordings -- with
Opacus DP-SGD when sample-level privacy is on -- using exactly the mechanism parameters the server
sent (``SampleLevel``, ``UserRound``), and replies with its model *update* (clipped and, under
local or distributed user-level DP, noised with its share). Every DP draw comes from the device's
own secret (``clients/state.py``), never from anything the server knows. Under any privacy level
the reply's metrics are the echo of those parameters and nothing else: no example count, loss or
timing. The device declines rounds past its own sample-level budget. Every reply passes the
outbound guard (``clients/guard.py``). Federated evaluation runs only without privacy (test
metrics are not covered by any guarantee). On ``query`` the device names itself with its stable
key, so a resumed server finds the same devices.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.faults import Faults
from clients.guard import allowed_metrics, outbound_guard
from clients.secure_app import secure_train_mods
from clients.state import DeviceState, Release, reply_digest, round_key
from fl import protocol as P
from fl.config import ModelConfig, SamplePrivacyConfig, TrainConfig, UserPrivacyConfig
from fl.data.fleet import DeviceData
from fl.model import Recognizer, build_recognizer
from fl.privacy.gaussian import model_delta
from fl.privacy.randomness import TRAINING
from fl.privacy.sample import SampleLevel
from fl.privacy.user import UserRound
from fl.train import evaluate, plain_round

log = logging.getLogger(__name__)


class DeviceStore(Protocol):
    """Where a device's recordings and its state folder (secret, ledger, round history) live."""

    def data(self, context: Context) -> DeviceData: ...

    def state(self, context: Context) -> Path: ...

    def key(self, context: Context) -> int:
        """A number that names this device across restarts (see ``server/devices.py``)."""
        ...


@dataclass(frozen=True)
class DeviceSettings:
    """A device's own training policy and privacy policy (None = that privacy level is off).

    The mechanisms' parameters come from the server in every train message; the policies give only
    what is the device's own: its ledger's delta and accountant, its budget, its secure mode.
    ``reproducible``: derive the device's secret from ``seed`` (simulations for exact reruns only).
    """

    model: ModelConfig
    train: TrainConfig
    sample: Optional[SamplePrivacyConfig]
    user: Optional[UserPrivacyConfig]
    seed: int
    threads: int = 1
    faults: Faults = Faults()
    reproducible: bool = False

    @property
    def private(self) -> bool:
        return self.sample is not None or self.user is not None

    def state(self, store: DeviceStore, context: Context) -> DeviceState:
        key = store.key(context)
        return DeviceState(store.state(context), (self.seed, key) if self.reproducible else None)


def _model(recognizer: Recognizer, msg: Message) -> torch.nn.Module:
    return recognizer.module_from(msg.content[P.ARRAYS].to_torch_state_dict())


def _declined(msg: Message) -> Message:
    return Message(content=RecordDict({P.METRICS: MetricRecord({P.DECLINED: 1})}), reply_to=msg)


def _train(settings: DeviceSettings, msg: Message, context: Context, store: DeviceStore,
           recognizer: Recognizer) -> Message:
    started = time.perf_counter()
    config = msg.content[P.CONFIG]
    server_round = int(config[P.ROUND])  # type: ignore[arg-type]
    device, state = store.data(context), settings.state(store, context)
    if not device.train and not settings.private:
        log.warning("device %s has no usable training recordings: declining round %d", store.key(context),
                    server_round)
        return _declined(msg)
    # the mechanisms exactly as the server sent them (a message without them is refused here)
    sample = SampleLevel.from_message(config, settings.sample) if settings.sample else None
    user = UserRound.from_message(config, settings.user.secure_mode) if settings.user else None
    settings.faults.before_training(context, settings.seed, server_round)
    with state.locked():
        return _release(settings, msg, context, store, recognizer, state, device, sample, user, started)


def _release(settings: DeviceSettings, msg: Message, context: Context, store: DeviceStore, recognizer: Recognizer,
             state: DeviceState, device: DeviceData, sample: Optional[SampleLevel], user: Optional[UserRound],
             started: float) -> Message:
    """Plan, train, privatise and commit one release under the state folder's lock (see ``_train``)."""
    server_round = int(msg.content[P.CONFIG][P.ROUND])  # type: ignore[arg-type]
    this_round = round_key(server_round, msg.content[P.ARRAYS])
    plan = state.plan(this_round)
    secret = state.secret()
    torch.manual_seed(int.from_bytes(secret.stream_key(TRAINING, plan.index)[:8], "big"))  # dropout etc.
    model = _model(recognizer, msg)
    base = {k: v.clone() for k, v in recognizer.shared(model).items()}
    metrics: dict[str, float | int] = {}
    account, before = None, None
    if sample is not None:
        account = state.account(sample.accountant)
        if plan.history is not None:
            account.history = list(plan.history)
        before = list(account.history)
        budget = settings.sample.max_epsilon if settings.sample else None
        after = account.plus(sample.noise_multiplier, sample.sample_rate, sample.steps).epsilon(sample.delta)
        if budget is not None and after > budget:
            spent = account.epsilon(sample.delta)
            log.warning("device %s: round %d would take epsilon from %.3f to %.3f > its budget %s: declining",
                        store.key(context), server_round, spent, after, budget)
            state.declined(server_round, "privacy budget spent", epsilon=spent, delta=sample.delta, max_epsilon=budget)
            return _declined(msg)
        sample.train(model, recognizer, device.train, settings.train, account, secret, plan.index)
        metrics |= sample.echo()
    elif device.train:
        seed = int.from_bytes(secret.stream_key(TRAINING, "batches", plan.index)[:8], "big")
        loss = plain_round(model, recognizer, device.train, settings.train, seed)
        if not settings.private:  # counts and losses are covered by no guarantee: sent only without DP
            metrics |= {P.NUM_EXAMPLES: len(device.train), P.TRAIN_LOSS: loss}
    update = model_delta(recognizer.shared(model), base)
    if user is not None:
        update, bit = user.privatize(update, secret, plan.index)
        metrics |= user.echo()
        if bit is not None:
            metrics[P.CLIP_BIT] = bit
    arrays, record = ArrayRecord(update), MetricRecord(metrics)
    digest = reply_digest(arrays, record)
    if plan.replaying is not None and digest != plan.replaying.digest:
        log.warning("device %s: round %d was asked again after a server restart and this reply differs from "
                    "the first one: declining (the first reply stays counted)", store.key(context), server_round)
        return _declined(msg)
    steps = sample.steps if sample else settings.train.local_steps
    state.commit(Release(this_round, digest, before, plan.index), account, server_round, steps,
                 len(device.train), time.perf_counter() - started, sample.delta if sample else None)
    settings.faults.after_training(context, settings.seed, server_round)
    return Message(content=RecordDict({P.ARRAYS: arrays, P.METRICS: record}), reply_to=msg)


def make_client_app(settings: DeviceSettings, store: DeviceStore, audit_dir: Optional[str] = None,
                    recognizer: Optional[Recognizer] = None) -> ClientApp:
    """Build the ClientApp for devices whose recordings and state ``store`` locates.

    ``audit_dir``: if set, the outbound guard logs the shape of every reply there. ``recognizer``:
    the one the store featurises with (built from ``settings`` if not given).
    """
    recognizer = recognizer or build_recognizer(settings.model, settings.train.trainable)
    reference = recognizer.shared(recognizer.new_module())
    shapes = {k: tuple(v.shape) for k, v in reference.items()}
    allowed = allowed_metrics(settings.sample is not None, settings.user is not None)
    guard = outbound_guard(shapes, allowed, audit_dir)
    if settings.user is not None and settings.user.noise == "distributed":
        # SecAgg+ wraps training; the clear-text guard checks the update before it is masked
        app = ClientApp()
        train_mods, evaluate_mods = secure_train_mods(shapes, allowed) + [guard], [guard]
    else:
        app = ClientApp(mods=[guard])
        train_mods, evaluate_mods = [], []

    @app.train(mods=train_mods)
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(settings.threads)
        return _train(settings, msg, context, store, recognizer)

    @app.query(mods=evaluate_mods)
    def query(msg: Message, context: Context) -> Message:
        return Message(content=RecordDict({P.METRICS: MetricRecord({P.DEVICE_KEY: store.key(context)})}),
                       reply_to=msg)

    @app.evaluate(mods=evaluate_mods)
    def evaluate_(msg: Message, context: Context) -> Message:
        if settings.private:
            raise PermissionError("federated evaluation is off under privacy: test metrics are covered by no DP "
                                  "guarantee, so this device sends none")
        torch.set_num_threads(settings.threads)
        device = store.data(context)
        metrics: dict[str, float | int] = {P.NUM_EXAMPLES: 0, P.WER: 0.0, P.CER: 0.0, P.LOSS: 0.0, P.WORDS: 0,
                                           P.CHARS: 0}  # no test recordings: counts nothing
        if device.test:
            result = evaluate(recognizer, _model(recognizer, msg), device.test)
            metrics = {
                P.NUM_EXAMPLES: result.utterances, P.WER: result.wer, P.CER: result.cer, P.LOSS: result.loss,
                P.WORDS: sum(len(e.text.split()) for e in device.test),
                P.CHARS: sum(len(e.text) for e in device.test),
            }
        return Message(content=RecordDict({P.METRICS: MetricRecord(metrics)}), reply_to=msg)

    return app
