"""The Flower ClientApp: what runs on a device.

On ``train`` the device loads the global weights and fine-tunes them on its own recordings -- with
Opacus DP-SGD when sample-level privacy is on -- using exactly the mechanism parameters the server
sent (``SampleLevel``, ``UserRound``), and replies with its model *update* (clipped and, under
local or distributed user-level DP, noised with its share); under DP-FedSGD
(``privacy.sample.noise=central|distributed``) it trains nothing and replies with the sum of its
Poisson batches' clipped per-utterance gradients (plus its noise share under ``distributed``). Every DP draw comes from the device's
own secret (``clients/state.py``), never from anything the server knows. Under any privacy level
the reply's metrics are the echo of those parameters and nothing else: no example count, loss or
timing. What the device trains on is labelled here, on the device (``fl/labels.py``, ``train.labels``:
its transcripts, its own pseudo-labels, or the user's corrections); no label, score or count of them
is ever part of a reply. Before training, the device checks every request against its own policy
(``clients/policy.py``: noise floors, allowed placements, its sample-level and server-facing
budgets over every run) and declines, with a fixed reason code, one that fails. Every reply passes the
outbound guard (``clients/guard.py``). Federated evaluation runs only without privacy (test
metrics are not covered by any guarantee). On ``query`` the device names itself with its stable
key, so a resumed server finds the same devices.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Protocol

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.faults import Faults
from clients.guard import DeviceError, allowed_metrics, outbound_guard
from clients.policy import Refusal, check_budgets, check_mechanism
from clients.secure_app import secure_train_mods
from clients.state import DeviceState, Release, ServerAccount, reply_digest, round_key
from fl import protocol as P
from fl.config import DevicePolicy, ModelConfig, SamplePrivacyConfig, TrainConfig, UserPrivacyConfig
from fl.data.fleet import DeviceData
from fl.labels import Labeler
from fl.model import Recognizer, build_recognizer
from fl.privacy.gaussian import model_delta
from fl.privacy.randomness import TRAINING
from fl.privacy.sample import ClippingModule, SampleAccount, SampleLevel
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

    The mechanisms' parameters come from the server in every train message; the settings give only
    what is the device's own: its ledgers' accountants, its secure mode, and ``policy``
    (:class:`~fl.config.DevicePolicy`: the floors, placements, budgets and delta every request is
    checked against before training, ``clients/policy.py``; the safe defaults unless the device's
    operator -- or a simulation's config -- says otherwise).
    ``reproducible``: derive the device's secret from ``seed`` (simulations for exact reruns only).
    ``corrected_fraction``: under ``train.labels=corrections``, the chance that a recording with a
    transcript counts as the user's correction (``data.corrected_fraction`` in a simulation; 1.0 on a
    deployed device, whose transcripts are all its user's).
    ``device``: where the device's models run (the ``device`` key: auto, cpu, cuda, cuda:N).
    """

    model: ModelConfig
    train: TrainConfig
    sample: Optional[SamplePrivacyConfig]
    user: Optional[UserPrivacyConfig]
    seed: int
    threads: int = 1
    faults: Faults = Faults()
    reproducible: bool = False
    policy: DevicePolicy = field(default_factory=DevicePolicy)
    corrected_fraction: float = 1.0
    device: str = "auto"

    @property
    def private(self) -> bool:
        return self.sample is not None or self.user is not None

    def sample_policy(self) -> SamplePrivacyConfig:
        """The sample-level settings the device trains and accounts with: the run's, at the smaller of
        its delta and the device's own."""
        assert self.sample is not None
        return replace(self.sample, delta=min(self.sample.delta, self.policy.delta))

    @property
    def secure(self) -> bool:
        """This device's app runs training under SecAgg+ (built with the secure mods, ``make_client_app``)."""
        return (self.user is not None and self.user.noise == "distributed") or \
            (self.sample is not None and self.sample.noise == "distributed")

    @property
    def evaluates(self) -> bool:
        """Federated evaluation: only with no privacy level on *and* a device policy that asks for none
        (test metrics are covered by no guarantee; a run config cannot switch the device's floor off)."""
        return not self.private and check_mechanism(self.policy, None, None) is None

    @property
    def server_delta(self) -> float:
        """The delta of the device's server-facing ledger: its own, or the run's user-level delta if smaller."""
        run = self.user.delta if self.user is not None else None
        return self.policy.delta if run is None else min(run, self.policy.delta)

    def state(self, store: DeviceStore, context: Context) -> DeviceState:
        key = store.key(context)
        return DeviceState(store.state(context), (self.seed, key) if self.reproducible else None)


def _model(recognizer: Recognizer, msg: Message) -> torch.nn.Module:
    return recognizer.module_from(msg.content[P.ARRAYS].to_torch_state_dict())


def _declined(msg: Message, code: int) -> Message:
    """A device's reply when it declines: ``declined`` = a code of ``fl.protocol.DECLINE_REASONS``, nothing else."""
    if code not in P.DECLINE_REASONS:
        raise ValueError(f"decline code {code!r} is not in fl.protocol.DECLINE_REASONS")
    return Message(content=RecordDict({P.METRICS: MetricRecord({P.DECLINED: int(code)})}), reply_to=msg)


def _decline(state: DeviceState, msg: Message, key: int, server_round: int, refusal: Refusal) -> Message:
    """Decline ``server_round`` for ``refusal``: a note for the owner, the code for the server."""
    log.warning("device %s declines round %d (%s): %s", key, server_round, refusal.reason, refusal.note)
    state.declined(server_round, refusal.reason, code=refusal.code, note=refusal.note, **refusal.figures)
    return _declined(msg, refusal.code)


def _train(settings: DeviceSettings, msg: Message, context: Context, store: DeviceStore,
           recognizer: Recognizer, clipping: Optional[ClippingModule] = None) -> Message:
    """One train message. ``clipping``: the process's DP-FedSGD module (reused across messages; a
    fresh one if not given)."""
    started = time.perf_counter()
    config = msg.content[P.CONFIG]
    server_round = int(config[P.ROUND])  # type: ignore[arg-type]
    device, state = store.data(context), settings.state(store, context)
    # the mechanisms exactly as the server sent them (a message without them is refused here) ...
    sample = SampleLevel.from_message(config, settings.sample_policy()) if settings.sample else None
    user = UserRound.from_message(config, settings.user.secure_mode) if settings.user else None
    # ... and checked against the device's own floor before anything is trained
    refusal = check_mechanism(settings.policy, sample, user, settings.secure)
    if refusal is not None:
        return _decline(state, msg, store.key(context), server_round, refusal)
    if not device.train and not settings.private:
        log.warning("device %s has no usable training recordings: declining round %d", store.key(context),
                    server_round)
        return _declined(msg, P.DECLINED_NO_DATA)
    if settings.train.labels == "transcripts" and not settings.private and device.train \
            and all(e.text is None for e in device.train):  # under DP it trains on none (noise alone), as above
        log.warning("device %s has recordings but no transcripts (train.labels=transcripts): declining round %d",
                    store.key(context), server_round)
        return _declined(msg, P.DECLINED_NO_TRANSCRIPTS)
    settings.faults.before_training(context, settings.seed, server_round)
    with state.locked():
        return _release(settings, msg, context, store, clipping or ClippingModule.of(recognizer), state, device, sample,
                        user, started)


def _release(settings: DeviceSettings, msg: Message, context: Context, store: DeviceStore, clipping: ClippingModule,
             state: DeviceState, device: DeviceData, sample: Optional[SampleLevel], user: Optional[UserRound],
             started: float) -> Message:
    """Plan, check the budgets, train, privatise and commit one release under the state folder's lock."""
    recognizer = clipping.recognizer
    config = msg.content[P.CONFIG]
    server_round = int(config[P.ROUND])  # type: ignore[arg-type]
    this_round = round_key(server_round, msg.content[P.ARRAYS], str(config.get(P.RUN_NONCE, "")))
    # noise split across devices (distributed): a repeat is never answered with the same bits (clients/state.py)
    fresh = (user is not None and user.noise_cohort > 1) or (sample is not None and sample.noise == "distributed")
    plan = state.plan(this_round, fresh=fresh)
    account: Optional[SampleAccount] = None
    server: Optional[ServerAccount] = None
    if sample is not None:
        account = state.account(sample.accountant)
        if plan.history is not None:
            account.history = list(plan.history)
    if user is not None:
        server = state.server_account(settings.user.accountant if settings.user else "pld")
        if plan.server_history is not None:
            server.history = list(plan.server_history)
    run_cap = settings.sample.max_epsilon if settings.sample else None
    refusal = check_budgets(settings.policy, sample, account, run_cap, user, server, settings.server_delta)
    if refusal is not None:
        return _decline(state, msg, store.key(context), server_round, refusal)
    before = list(account.history) if account is not None else None
    server_before = list(server.history) if server is not None else None
    secret = state.secret()
    # the (recording, label) pairs of this round, made here, batch by batch once drawn, and kept here
    seed_teacher = settings.train.teacher == "seed"  # the pinned seed the device loads itself, or the global model
    teacher = (lambda: recognizer.new_module()) if seed_teacher else (lambda: _model(recognizer, msg))
    label = Labeler(settings.train, recognizer, teacher, secret, settings.corrected_fraction)
    # dropout masks and plain batches: not DP draws (no guarantee rests on their secrecy), so torch's
    # generators are fine here (on a GPU this seeds CUDA's too, for dropout alone); every DP draw below
    # comes from the secret's ChaCha20 streams, drawn on the CPU and moved to the device
    torch.manual_seed(int.from_bytes(secret.stream_key(TRAINING, plan.index)[:8], "big"))
    metrics: dict[str, float | int] = {}
    if sample is not None and sample.aggregated:  # DP-FedSGD: the clipped sum goes out, the noise on the total
        assert account is not None
        update = sample.clipped_sum(msg.content[P.ARRAYS].to_torch_state_dict(), clipping, device.train, account,
                                    secret, plan.index, label)
        metrics |= sample.echo()
    else:
        model = _model(recognizer, msg)
        base = {k: v.clone() for k, v in recognizer.shared(model).items()}
        if sample is not None:
            assert account is not None
            sample.train(model, recognizer, device.train, settings.train, account, secret, plan.index, label)
            metrics |= sample.echo()
        elif device.train:
            seed = int.from_bytes(secret.stream_key(TRAINING, "batches", plan.index)[:8], "big")
            loss = plain_round(model, recognizer, device.train, settings.train, seed, label)
            if not settings.private:  # counts and losses are covered by no guarantee: sent only without DP
                if not label.kept:  # nothing drawn got a label: nothing trained, nothing committed
                    return _decline(state, msg, store.key(context), server_round, Refusal(
                        P.DECLINED_NO_DATA, f"no drawn recording got a label (train.labels={settings.train.labels})"))
                # the device's recordings, as under transcripts: never how many got a label
                metrics |= {P.NUM_EXAMPLES: len(device.train), P.TRAIN_LOSS: loss}
        update = model_delta(recognizer.shared(model), base)
    if user is not None:
        assert server is not None
        update, bit = user.privatize(update, secret, plan.index)
        server = server.plus(user.noise_multiplier, user.noise_cohort)
        metrics |= user.echo()
        if bit is not None:
            metrics[P.CLIP_BIT] = bit
    arrays, record = ArrayRecord(update), MetricRecord(metrics)
    digest = reply_digest(arrays, record)
    if plan.replaying is not None and digest != plan.replaying.digest:
        return _decline(state, msg, store.key(context), server_round, Refusal(
            P.DECLINED_REPLAY_DIFFERS, "asked again after a server restart, and this reply differs from the first "
            "one (the first reply stays counted)"))
    steps = sample.steps if sample else settings.train.local_steps
    state.commit(Release(this_round, digest, before, plan.index, server_before, replayable=not fresh), account,
                 server_round, steps, label.kept, time.perf_counter() - started,
                 sample.delta if sample else None, server=server,
                 server_delta=settings.server_delta if server is not None else None)
    settings.faults.after_training(context, settings.seed, server_round)
    return Message(content=RecordDict({P.ARRAYS: arrays, P.METRICS: record}), reply_to=msg)


def make_client_app(settings: DeviceSettings, store: DeviceStore, audit_dir: Optional[str] = None,
                    recognizer: Optional[Recognizer] = None) -> ClientApp:
    """Build the ClientApp for devices whose recordings and state ``store`` locates.

    ``audit_dir``: if set, the outbound guard logs the shape of every reply it let through there (a
    deployed device's ``--audit-dir``; ``clients/guard.py``). ``recognizer``:
    the one the store featurises with (built from ``settings`` if not given).
    """
    recognizer = recognizer or build_recognizer(settings.model, settings.train.trainable, settings.device)
    reference = recognizer.shared(recognizer.new_module())
    shapes = {k: tuple(v.shape) for k, v in reference.items()}
    allowed = allowed_metrics(settings.sample is not None, settings.user is not None)
    guard = outbound_guard(shapes, allowed, audit_dir)
    clipping = ClippingModule.of(recognizer)  # DP-FedSGD's wrapped module: built at the first clipped sum, then reused
    if settings.secure:
        # SecAgg+ wraps training; the clear-text guard checks the update before it is masked
        app = ClientApp()
        train_mods, evaluate_mods = secure_train_mods(shapes, allowed) + [guard], [guard]
    else:
        app = ClientApp(mods=[guard])
        train_mods, evaluate_mods = [], []

    @app.train(mods=train_mods)
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(settings.threads)
        return _train(settings, msg, context, store, recognizer, clipping)

    @app.query(mods=evaluate_mods)
    def query(msg: Message, context: Context) -> Message:
        return Message(content=RecordDict({P.METRICS: MetricRecord({P.DEVICE_KEY: store.key(context)})}),
                       reply_to=msg)

    @app.evaluate(mods=evaluate_mods)
    def evaluate_(msg: Message, context: Context) -> Message:
        if not settings.evaluates:
            raise DeviceError(P.ERROR_EVALUATION_REFUSED, "federated evaluation is off under privacy (the run's or "
                              "this device's policy): test metrics are covered by no DP guarantee, so it sends none")
        torch.set_num_threads(settings.threads)
        device = store.data(context)
        metrics: dict[str, float | int] = {P.NUM_EXAMPLES: 0, P.WER: 0.0, P.CER: 0.0, P.LOSS: 0.0, P.WORDS: 0,
                                           P.CHARS: 0}  # no test recordings: counts nothing
        tests = [e for e in device.test if e.text is not None]  # no reference, no score
        if tests:
            result = evaluate(recognizer, _model(recognizer, msg), tests)
            metrics = {
                P.NUM_EXAMPLES: result.utterances, P.WER: result.wer, P.CER: result.cer, P.LOSS: result.loss,
                P.WORDS: sum(len(e.text.split()) for e in tests),  # type: ignore[union-attr]
                P.CHARS: sum(len(e.text) for e in tests),  # type: ignore[arg-type]
            }
        return Message(content=RecordDict({P.METRICS: MetricRecord(metrics)}), reply_to=msg)

    return app
