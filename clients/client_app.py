"""The Flower ClientApp: what runs on a device.

On ``train`` the device loads the global weights, fine-tunes them on its own recordings -- with
Opacus DP-SGD when sample-level privacy is on -- and replies with its model *update* (clipped and,
under local user-level DP, noised) and a few scalars. The epsilon it reports covers every round it
ever trained in, and it declines rounds past its own budget. On ``evaluate`` it reports WER/CER of the global model
on its local test split, and its current epsilon. Every reply passes ``outbound_guard``.
The DP-SGD ledger is a file on the device (``clients/budget.py``), written before the reply; a
round asked again after a server restart is answered as ``clients/replay.py`` says. On ``query``
the device names itself with its stable key, so a resumed server finds the same devices.
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

from clients import budget, replay
from clients.faults import Faults
from clients.guard import outbound_guard
from clients.history import append_round
from clients.secure_app import secure_train_mods
from fl import protocol as P
from fl.config import ModelConfig, SamplePrivacyConfig, TrainConfig, UserPrivacyConfig
from fl.data.fleet import DeviceData
from fl.data.text import CharTokenizer
from fl.model.conformer import ConformerCTC
from fl.privacy.sample import History, SampleAccount, dp_sgd_round, sample_rate
from fl.privacy.update import model_delta, privatize_update
from fl.train import evaluate, freeze_except, plain_round

log = logging.getLogger(__name__)


class DeviceStore(Protocol):
    """Where a device's recordings and its state folder (privacy ledger, round history) live."""

    def data(self, context: Context) -> DeviceData: ...

    def state(self, context: Context) -> Path: ...

    def key(self, context: Context) -> int:
        """A number that names this device across restarts (see ``server/devices.py``)."""
        ...


@dataclass(frozen=True)
class DeviceSettings:
    """A device's own training and privacy policy (None = that privacy level is off)."""

    model: ModelConfig
    train: TrainConfig
    sample: Optional[SamplePrivacyConfig]
    user: Optional[UserPrivacyConfig]
    seed: int
    threads: int = 1
    faults: Faults = Faults()


def _model(settings: DeviceSettings, msg: Message, tokenizer: CharTokenizer) -> ConformerCTC:
    model = ConformerCTC(settings.model, tokenizer.vocab_size)
    model.load_state_dict(msg.content[P.ARRAYS].to_torch_state_dict())
    return model


def _privacy_metrics(account: SampleAccount, cfg: SamplePrivacyConfig) -> dict[str, float]:
    if not account.history:
        return {}
    z, q, _ = account.history[-1]
    return {P.EPSILON_SAMPLE: account.epsilon(cfg.delta), P.DP_STEPS: account.steps, P.SAMPLE_RATE: q,
            P.NOISE_MULTIPLIER: z, P.MAX_GRAD_NORM: cfg.max_grad_norm}


def _declined(msg: Message, metrics: dict[str, float | int]) -> Message:
    return Message(content=RecordDict({P.METRICS: MetricRecord({P.DECLINED: 1, **metrics})}), reply_to=msg)


def _train(settings: DeviceSettings, msg: Message, context: Context, store: DeviceStore,
           tokenizer: CharTokenizer) -> Message:
    config = msg.content[P.CONFIG]
    server_round = int(config[P.ROUND])
    device, state = store.data(context), store.state(context)
    if not device.train:
        log.warning("device %s has no usable training recordings: declining round %d", device.device_id,
                    server_round)
        return _declined(msg, {})
    settings.faults.before_training(context, settings.seed, server_round)
    seed = settings.seed * 1_000_003 + server_round * 1009 + store.key(context) % 1_000_003
    this_round = replay.round_key(server_round, msg.content[P.ARRAYS])
    previous = replay.load(state)
    replayed = previous if previous is not None and previous.round_key == this_round else None
    torch.manual_seed(seed)
    model = _model(settings, msg, tokenizer)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    freeze_except(model, settings.train.trainable)
    # under user-level DP the average is unweighted: the example count is not needed, so not sent
    metrics: dict[str, float | int] = {} if settings.user else {P.NUM_EXAMPLES: len(device.train)}
    dp = settings.sample
    ledger = state / budget.LEDGER
    before: Optional[History] = None
    if dp is not None:
        account = budget.load_account(ledger, dp.accountant)
        if replayed is not None and replayed.history_before is not None:
            account.history = list(replayed.history_before)
        before = list(account.history)
        rate = sample_rate(len(device.train), settings.train.batch_size)
        sigma = budget.noise_multiplier(ledger, dp, rate, settings.train.local_steps,
                                        int(config[P.PLANNED_ROUNDS]), float(config[P.PARTICIPATION]))
        if budget.would_exceed(account, dp, sigma, rate, settings.train.local_steps):
            spent = account.epsilon(dp.delta)
            log.warning("device %s: privacy budget spent (epsilon %.3f, max %s): declining round %d",
                        device.device_id, spent, dp.max_epsilon, server_round)
            budget.record_budget_spent(state, spent, dp, server_round)
            return _declined(msg, _privacy_metrics(account, dp))
        stats = dp_sgd_round(model, device.train, settings.train, dp, account, tokenizer.blank,
                             settings.model.n_mels, seed, noise_multiplier=sigma)
        metrics |= {P.EMPTY_STEPS: stats.empty_steps, **_privacy_metrics(account, dp)}
    else:
        loss = plain_round(model, device.train, settings.train, tokenizer.blank, settings.model.n_mels, seed)
        if settings.user is None:  # a training loss is not covered by any DP guarantee: only without DP
            metrics[P.TRAIN_LOSS] = loss
    update = model_delta(model.state_dict(), base)
    if settings.user is not None:
        generator = torch.Generator().manual_seed(seed)
        update, bit = privatize_update(update, settings.user, float(config[P.CLIP_NORM]),
                                       int(config[P.NOISE_COHORT]), generator,
                                       secure=bool(dp and dp.secure_mode))
        if bit is not None:
            metrics[P.CLIP_BIT] = bit
    arrays, record = ArrayRecord(update), MetricRecord(metrics)
    digest = replay.reply_digest(arrays, record)
    if replayed is not None and digest != replayed.digest:
        log.warning("device %s: round %d was asked again after a server restart and this reply differs from "
                    "the first one: declining (the first reply stays counted)", device.device_id, server_round)
        return _declined(msg, _privacy_metrics(budget.load_account(ledger, dp.accountant), dp) if dp else {})
    replay.save(state, replay.Release(this_round, digest, before))
    if dp is not None:
        budget.save_account(ledger, account, sigma)
    if replayed is None:
        append_round(state, server_round, settings.train.local_steps, len(device.train))
    settings.faults.after_training(context, settings.seed, server_round)
    return Message(content=RecordDict({P.ARRAYS: arrays, P.METRICS: record}), reply_to=msg)


def make_client_app(settings: DeviceSettings, store: DeviceStore, audit_dir: Optional[str] = None) -> ClientApp:
    """Build the ClientApp for devices whose recordings and ledger ``store`` locates.

    ``audit_dir``: if set, the outbound guard logs the shape of every reply there.
    """
    tokenizer = CharTokenizer()
    reference = ConformerCTC(settings.model, tokenizer.vocab_size).state_dict()
    shapes = {k: tuple(v.shape) for k, v in reference.items()}
    guard = outbound_guard(shapes, audit_dir)
    if settings.user is not None and settings.user.noise == "distributed":
        # SecAgg+ wraps training; the clear-text guard checks the update before it is masked
        app = ClientApp()
        train_mods, evaluate_mods = secure_train_mods(shapes) + [guard], [guard]
    else:
        app = ClientApp(mods=[guard])
        train_mods, evaluate_mods = [], []

    @app.train(mods=train_mods)
    def train(msg: Message, context: Context) -> Message:
        started = time.perf_counter()
        torch.set_num_threads(settings.threads)
        reply = _train(settings, msg, context, store, tokenizer)
        if reply.has_content() and P.METRICS in reply.content:
            reply.content[P.METRICS][P.SECONDS] = time.perf_counter() - started
        return reply

    @app.query(mods=evaluate_mods)
    def query(msg: Message, context: Context) -> Message:
        return Message(content=RecordDict({P.METRICS: MetricRecord({P.DEVICE_KEY: store.key(context)})}),
                       reply_to=msg)

    @app.evaluate(mods=evaluate_mods)
    def evaluate_(msg: Message, context: Context) -> Message:
        torch.set_num_threads(settings.threads)
        device = store.data(context)
        metrics: dict[str, float | int] = {P.NUM_EXAMPLES: 0, P.WER: 0.0, P.CER: 0.0, P.LOSS: 0.0, P.WORDS: 0,
                                           P.CHARS: 0}  # no test recordings: counts nothing
        if device.test:
            result = evaluate(_model(settings, msg, tokenizer), device.test, tokenizer, settings.model.n_mels)
            metrics = {
                P.NUM_EXAMPLES: result.utterances, P.WER: result.wer, P.CER: result.cer, P.LOSS: result.loss,
                P.WORDS: sum(len(e.text.split()) for e in device.test),
                P.CHARS: sum(len(e.text) for e in device.test),
            }
        if settings.sample is not None:
            metrics |= _privacy_metrics(budget.load_account(store.state(context) / budget.LEDGER,
                                                             settings.sample.accountant),
                                        settings.sample)
        return Message(content=RecordDict({P.METRICS: MetricRecord(metrics)}), reply_to=msg)

    return app
