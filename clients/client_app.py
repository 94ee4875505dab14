"""The Flower ClientApp: what runs on a device.

On ``train`` the device loads the global weights, fine-tunes them on its own recordings -- with
Opacus DP-SGD when sample-level privacy is on -- and replies with the new weights and a few
scalars. Its DP-SGD history lives in the device's persistent ``context.state``, so the epsilon it
reports is cumulative over every round it has trained in. On ``evaluate`` it reports WER/CER of
the global model on its local test split.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl import protocol as P
from fl.config import ModelConfig, SamplePrivacyConfig, TrainConfig
from fl.data.fleet import DeviceData
from fl.data.text import CharTokenizer
from fl.model.conformer import ConformerCTC
from fl.privacy.sample import SampleAccount, dp_sgd_round
from fl.train import evaluate, freeze_except, plain_round

log = logging.getLogger(__name__)

DataSource = Callable[[Context], DeviceData]


@dataclass(frozen=True)
class DeviceSettings:
    """A device's own training policy. ``privacy`` is None when sample-level DP is off."""

    model: ModelConfig
    train: TrainConfig
    privacy: Optional[SamplePrivacyConfig]
    seed: int
    threads: int = 1


def load_account(context: Context, accountant: str) -> SampleAccount:
    rec = context.state.get(P.STATE_DP)
    if rec is None:
        return SampleAccount(accountant=accountant)
    history = list(zip(rec["noise"], rec["rate"], rec["steps"]))
    return SampleAccount(history=[(float(z), float(q), int(n)) for z, q, n in history], accountant=accountant)


def save_account(context: Context, account: SampleAccount) -> None:
    context.state[P.STATE_DP] = ConfigRecord(
        {
            "noise": [float(z) for z, _, _ in account.history],
            "rate": [float(q) for _, q, _ in account.history],
            "steps": [int(n) for _, _, n in account.history],
        }
    )


def _model(settings: DeviceSettings, msg: Message, tokenizer: CharTokenizer) -> ConformerCTC:
    model = ConformerCTC(settings.model, tokenizer.vocab_size)
    model.load_state_dict(msg.content[P.ARRAYS].to_torch_state_dict())
    return model


def make_client_app(settings: DeviceSettings, data: DataSource) -> ClientApp:
    """Build the ClientApp for devices whose recordings ``data(context)`` returns."""
    app = ClientApp()
    tokenizer = CharTokenizer()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        started = time.perf_counter()
        torch.set_num_threads(settings.threads)
        device = data(context)
        server_round = int(msg.content[P.CONFIG][P.ROUND])
        seed = settings.seed * 1_000_003 + server_round * 1009 + int(context.node_id % 1_000_003)
        torch.manual_seed(seed)
        model = _model(settings, msg, tokenizer)
        freeze_except(model, settings.train.trainable)
        metrics: dict[str, float | int] = {P.NUM_EXAMPLES: len(device.train)}
        if settings.privacy is not None:
            account = load_account(context, settings.privacy.accountant)
            stats = dp_sgd_round(
                model, device.train, settings.train, settings.privacy, account,
                tokenizer.blank, settings.model.n_mels, seed,
            )
            save_account(context, account)
            metrics |= {
                P.TRAIN_LOSS: stats.mean_loss,
                P.EPSILON_SAMPLE: account.epsilon(settings.privacy.delta),
                P.DP_STEPS: account.steps,
                P.EMPTY_STEPS: stats.empty_steps,
                P.SAMPLE_RATE: stats.sample_rate,
                P.NOISE_MULTIPLIER: settings.privacy.noise_multiplier,
                P.MAX_GRAD_NORM: settings.privacy.max_grad_norm,
            }
        else:
            metrics[P.TRAIN_LOSS] = plain_round(model, device.train, settings.train, tokenizer.blank,
                                                settings.model.n_mels, seed)
        metrics[P.SECONDS] = time.perf_counter() - started
        content = RecordDict({P.ARRAYS: ArrayRecord(model.state_dict()), P.METRICS: MetricRecord(metrics)})
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        torch.set_num_threads(settings.threads)
        device = data(context)
        result = evaluate(_model(settings, msg, tokenizer), device.test, tokenizer, settings.model.n_mels)
        metrics = MetricRecord({
            P.NUM_EXAMPLES: result.utterances,
            P.WER: result.wer,
            P.CER: result.cer,
            P.LOSS: result.loss,
            P.WORDS: sum(len(e.text.split()) for e in device.test),
            P.CHARS: sum(len(e.text) for e in device.test),
        })
        return Message(content=RecordDict({P.METRICS: metrics}), reply_to=msg)

    return app
