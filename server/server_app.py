"""The Flower ServerApp: the round loop, aggregation, evaluation, checkpoints and results.

Each round: sample devices (Poisson by default, with the server's secret coins), send them the
global model and the exact privacy parameters they must use, check every reply against the global
model and those parameters (dropping bad ones with a reason), combine the rest (example-weighted
FedAvg without privacy, the unweighted mean under sample-level DP, the user-level DP average of
``fl/privacy/user.py``), commit the new model and the round's accounting to the private state
(``server/checkpoint.py``) *before* the model goes anywhere, then evaluate it on held-out
speakers (server side) and -- without privacy only -- on the devices' local test splits
(federated evaluation every ``device_eval_every`` rounds and after the last, on all devices or
``eval_devices`` of them), publish its checkpoint and append a row to ``results.jsonl`` with the
privacy spent so far, each epsilon named for its observer. ``privacy.max_epsilon`` stops the run
before a round that would take any level past it; ``resume`` continues an interrupted run.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from rich.progress import Progress

from fl.config import Config, FederationConfig, ModelConfig, SamplePrivacyConfig, TrainConfig, UserPrivacyConfig
from fl.model import build_recognizer
from fl.privacy.randomness import COHORT, REPRODUCIBLE_LABEL
from fl.privacy.sample import SampleLevel
from fl.privacy.user import UserLevel
from fl.train import evaluate as evaluate_model
from fl.train import evaluation_devices
from server import checkpoint, rounds
from server.aggregate import Mechanisms, RoundOutcome, plain_round, secure_round
from server.devices import identify
from server.inbound import InboundInventory
from server.ledger import ParticipationLedger
from server.optimizer import ServerOptimizer
from server.results import ResultsWriter, RoundRow, write_private_summary
from server.sampling import participation_rate, sample_cohort

log = logging.getLogger(__name__)

FEDERATED_EVAL_OFF = ("off: privacy is on, and per-device test metrics are covered by no DP guarantee, so devices "
                      "send none (the simulation's experimenter-view evaluation is in experimenter_view.json)")


@dataclass(frozen=True)
class ServerSettings:
    out_dir: str
    rounds: int
    clients_per_round: int
    round_timeout: float
    seed: int
    model: ModelConfig
    train: TrainConfig
    initial_weights: str
    eval_examples: str
    config: dict[str, Any]
    sampling: str = "poisson"
    sample: Optional[SamplePrivacyConfig] = None
    user: Optional[UserPrivacyConfig] = None
    max_epsilon: Optional[float] = None
    reproducible: bool = False
    device_eval_every: int = 1
    eval_devices: int = 0
    resume: bool = False
    federation: FederationConfig = field(default_factory=FederationConfig)
    """The server optimizer (``server_optimizer``, ``server_lr``, ...) and ``eval_every``."""
    device: str = "auto"
    """Where the server's model evaluates (the ``device`` key); aggregation and noise stay on the CPU."""

    @classmethod
    def from_config(cls, cfg: Config, resolved: dict[str, Any], out_dir: str, initial_weights: str,
                    eval_examples: str) -> "ServerSettings":
        """The server's part of a run's config (``resolved`` is recorded in the summary and checkpoint)."""
        fed = cfg.federation
        return cls(
            out_dir=out_dir, rounds=fed.rounds, clients_per_round=fed.clients_per_round,
            round_timeout=fed.round_timeout, seed=cfg.seed, model=cfg.model, train=cfg.train,
            initial_weights=initial_weights, eval_examples=eval_examples, config=resolved, sampling=fed.sampling,
            sample=cfg.privacy.sample, user=cfg.privacy.user, max_epsilon=cfg.privacy.max_epsilon,
            reproducible=cfg.privacy.reproducible, device_eval_every=fed.device_eval_every,
            eval_devices=fed.eval_devices, resume=cfg.resume, federation=fed, device=cfg.device,
        )

    @property
    def private(self) -> bool:
        return self.sample is not None or self.user is not None


PROGRESS = "progress.json"
"""What the server is doing now (phase, round, devices connected, replies), rewritten as the run
goes, for ``unheard-launch``'s live view. Under privacy public figures only (:func:`progress_fields`)."""
WAITING = "waiting for devices"
PROGRESS_UNDER_PRIVACY = frozenset({"phase", "round", "rounds", "wanted", "expected_cohort"})
"""What ``progress.json`` may say under privacy: no realised cohort, replies, failures or rejections,
no timestamp, and devices connected only while waiting for them (the population, before any round)."""


def progress_fields(private: bool, **fields: Any) -> dict[str, Any]:
    """``progress.json``'s content: everything and the time without privacy, else only public figures."""
    if not private:
        return {"time": time.time(), **fields}
    return {k: v for k, v in fields.items()
            if k in PROGRESS_UNDER_PRIVACY or (k == "connected" and fields.get("phase") == WAITING)}


def _progress(out: Path, private: bool, **fields: Any) -> None:
    tmp = out / (PROGRESS + ".tmp")
    tmp.write_text(json.dumps(progress_fields(private, **fields)))
    tmp.replace(out / PROGRESS)


def _wait_for_nodes(grid: Grid, wanted: int, timeout: float, out: Path, private: bool = True) -> list[int]:
    """Wait until ``wanted`` devices are connected (up to ``timeout`` s), saying how many are."""
    deadline, said = time.monotonic() + timeout, -1
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) != said:
            log.info("%d of %d devices connected", len(nodes), wanted)
            _progress(out, private, phase=WAITING, connected=len(nodes), wanted=wanted)
            said = len(nodes)
        if len(nodes) >= wanted or time.monotonic() > deadline:
            return nodes
        time.sleep(1.0)


def _mechanisms(s: ServerSettings, population: int, nonce: str = "") -> Mechanisms:
    """The run's mechanisms, built from config in one place (raises ``ValueError`` for an impossible one);
    ``nonce``: the run's, sent in every train message."""
    expected = min(s.clients_per_round, population)
    sample = SampleLevel.from_config(s.sample, s.train, s.rounds, expected) if s.sample else None
    user = UserLevel(s.user, population, s.clients_per_round, s.sampling, s.rounds) if s.user else None
    secret = checkpoint.run_secret(Path(s.out_dir), s.seed if s.reproducible else None)
    return Mechanisms(sample, user, secret, nonce)


def run_server(grid: Grid, s: ServerSettings) -> list[RoundRow]:
    """Run up to ``s.rounds`` rounds of federated training; returns the rows written to results.jsonl.

    One ServerApp per run folder: a second one on the same folder fails at once. With
    ``federation.audit_outbound`` every reply is described at receipt in ``inbound/`` (``server/inbound.py``)."""
    with checkpoint.exclusive(Path(s.out_dir)):
        if s.federation.audit_outbound:
            grid = InboundInventory(grid, Path(s.out_dir))
        return _run_server(grid, s)


def _run_server(grid: Grid, s: ServerSettings) -> list[RoundRow]:
    out = Path(s.out_dir)
    resumed = checkpoint.resumable(out, s.config) if s.resume else None
    recognizer = build_recognizer(s.model, s.train.trainable, s.device)
    model = recognizer.module_from(torch.load(s.initial_weights, weights_only=False)["state_dict"])
    eval_set = torch.load(s.eval_examples, weights_only=False)
    arrays = ArrayRecord(recognizer.shared(model))
    ledger = ParticipationLedger()
    optimizer = ServerOptimizer.from_config(s.federation, s.sample, s.user)
    nodes = _wait_for_nodes(grid, s.clients_per_round, s.round_timeout, out, s.private)
    if not nodes:
        raise RuntimeError("no devices connected within federation.round_timeout: nothing to train on")
    if s.user is not None and len(nodes) < s.clients_per_round:
        raise RuntimeError(f"a cohort of {s.clients_per_round} devices a round is larger than the {len(nodes)} devices "
                           "connected: user-level DP cannot run; lower federation.clients_per_round or connect more")
    devices = identify(grid, nodes, s.round_timeout)
    participation = participation_rate(s.clients_per_round, len(nodes))
    expected = min(s.clients_per_round, len(nodes))  # the devices a round asks on average: public config
    writer = ResultsWriter(out, s.private, expected, checkpoint.private_path(out))
    # the run nonce: drawn once per run, committed with the state (so a resumed run keeps it)
    nonce = resumed.nonce if resumed is not None and resumed.nonce else checkpoint.run_nonce()
    if resumed is not None and not resumed.nonce:
        log.warning("the interrupted run's state has no run nonce: devices treat this run's requests as new ones")
    try:
        mech = _mechanisms(s, len(nodes), nonce)
    except ValueError as err:
        raise RuntimeError(f"the privacy settings cannot run: {err}") from None
    sample, user = mech.sample, mech.user
    randomness = REPRODUCIBLE_LABEL if s.reproducible else "secret"
    if s.reproducible:
        log.warning("privacy.reproducible=true: %s", REPRODUCIBLE_LABEL)
    log.info("%d devices, %s sampling of %d a round (q = %.3f)", len(nodes), s.sampling, s.clients_per_round,
             participation)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    stopped: Optional[str] = None

    def measure(r: int, started: float, outcome: Optional[RoundOutcome]) -> RoundRow:
        """Evaluate the committed model of round ``r`` (federated evaluation only without privacy)."""
        recognizer.load_shared(model, arrays.to_torch_state_dict())
        every = s.federation.eval_every
        scored = r == 0 or r == s.rounds or (every > 0 and r % every == 0)
        central = evaluate_model(recognizer, model, eval_set) if scored else None
        dwer = dcer = None
        if not s.private and (r == s.rounds or (s.device_eval_every > 0 and r % s.device_eval_every == 0)):
            evaluated = devices.nodes(evaluation_devices(devices.keys, s.eval_devices, s.seed, r))
            fed = rounds.evaluate(grid, evaluated, arrays, r, s.round_timeout, {})
            dwer, dcer = rounds.pooled_error_rates(fed)
        o = outcome or RoundOutcome()
        return RoundRow(
            round=r, wer=central.wer if central else None, cer=central.cer if central else None,
            loss=central.loss if central else None, device_wer=dwer, device_cer=dcer,
            train_loss=o.train_loss, clients=o.updates, declined=o.declined, failures=o.failures,
            rejected=o.rejected, epsilon_sample=ledger.sample_epsilon(sample),
            epsilon_user=user.epsilon() if user else None, epsilon_user_server=ledger.user_server_epsilon(user),
            delta=sample.delta if sample else (user.delta if user else None),
            delta_user=user.delta if user else None, extrapolated=bool(user and user.extrapolated),
            randomness=randomness, seconds=time.perf_counter() - started,
            raw_wer=central.raw_wer if central else None, loops_cut=central.loops_cut if central else None,
        )

    def commit(r: int, rows: list[RoundRow]) -> None:
        """Write the server's private state: the model and accounting of round ``r`` and the rows so far."""
        checkpoint.save(out, checkpoint.ServerState(
            round=r, arrays=arrays.to_torch_state_dict(), rows=[asdict(row) for row in rows],
            ledger=ledger.state_dict(), user=user.state_dict() if user else None, config=s.config, nonce=mech.nonce,
            optimizer=optimizer.state_dict()))

    def publish(row: RoundRow) -> None:
        torch.save({"round": row.round, "state_dict": arrays.to_torch_state_dict()},
                   out / "checkpoints" / f"round-{row.round:03d}.pt")
        writer.append(row)

    def finish(r: int, started: float, outcome: Optional[RoundOutcome]) -> RoundRow:
        """Measure the committed round ``r``, commit its row, then publish it."""
        row = measure(r, started, outcome)
        commit(r, writer.rows + [row])
        publish(row)
        return row

    first, retried = 1, None
    if resumed is None:
        commit(0, [])
        finish(0, time.perf_counter(), None)
    else:
        arrays = ArrayRecord(resumed.arrays)
        ledger.load_state_dict(resumed.ledger)
        if resumed.optimizer is not None:
            optimizer.load_state_dict(resumed.optimizer)
        if user and resumed.user:
            user.load_state_dict(resumed.user)
        rows = [RoundRow(**r) for r in resumed.rows]
        if resumed.measured:
            writer.restore(rows[:-1])
            publish(rows[-1])  # again: the interruption may have come between commit and publish
        else:  # aggregated and committed, never measured or published: measure it now
            writer.restore(rows)
            finish(resumed.round, time.perf_counter(), None)
        first = resumed.round + 1
        if resumed.measured and mech.secure:
            retried = first  # the interrupted attempt at it may have been decoded (see the loop)
        log.info("resuming after round %d of %d from %s", resumed.round, s.rounds, checkpoint.state_path(out))
    with Progress() as progress:
        bar = progress.add_task("federated rounds", total=s.rounds, completed=first - 1)
        for r in range(first, s.rounds + 1):
            stopped = _budget_stop(s, mech, ledger, r)
            if stopped:
                log.warning("budget stop: %s", stopped)
                break
            started = time.perf_counter()
            cohort = sample_cohort(devices.keys, s.clients_per_round, s.sampling, mech.secret.stream(COHORT, r))
            _progress(out, s.private, phase="training", round=r, rounds=s.rounds,
                      connected=len(grid.get_node_ids()), expected_cohort=expected, cohort=len(cohort))
            if r == retried:
                # distributed noise: devices answer a repeated request with fresh noise (clients/state.py), so the
                # interrupted attempt's sum, had it been decoded, is a release of its own: charge its cohort for it
                ledger.charge(cohort)
                commit(r - 1, writer.rows)
                stopped = _budget_stop(s, mech, ledger, r)
                if stopped:
                    log.warning("budget stop: %s", stopped)
                    break
            run_round = secure_round if mech.secure else plain_round
            mean, outcome, declined = run_round(grid, mech, devices, cohort, arrays, r, s.round_timeout, s.train)
            if mean is not None:  # post-processing of the round's release: no privacy cost
                arrays = ArrayRecord(optimizer.step(arrays.to_torch_state_dict(), mean))
            ledger.charge(k for k in cohort if k not in set(declined))
            commit(r, writer.rows)  # before the new model goes anywhere
            trained = time.perf_counter()
            row = finish(r, started, outcome)
            log.info("round %d: %.2f s with the devices, %.2f s evaluating and checkpointing", r,
                     trained - started, time.perf_counter() - trained)
            log.info("round %d: WER %s, eps sample %s, user %s (models) %s (server); %d updates, %d declined, "
                     "%d failed, %d rejected", r, row.wer, row.epsilon_sample, row.epsilon_user,
                     row.epsilon_user_server, row.clients, row.declined, row.failures, row.rejected)
            progress.update(bar, advance=1, description=f"round {r}: WER {row.wer if row.wer is None else round(row.wer, 3)}")
            _progress(out, s.private, phase="round done", round=r, rounds=s.rounds,
                      connected=len(grid.get_node_ids()), expected_cohort=expected, cohort=len(cohort),
                      replies=row.clients + row.declined, failures=row.failures, rejected=row.rejected)
    seed, final = writer.rows[0], writer.rows[-1]
    _progress(out, s.private, phase="finished", round=final.round, rounds=s.rounds)
    seconds = sum(row.seconds for row in writer.rows)
    # realised figures no epsilon covers: the experimenter's alone (published too without privacy)
    write_private_summary(checkpoint.private_path(out), {"seconds": seconds, "devices_charged": len(ledger.charged),
                                                          "worst_device_rounds": ledger.worst})
    writer.write_summary({
        "config": s.config,
        "seed_model": _scores(seed),
        "final": _scores(final),
        "rounds": final.round,
        "resumed_after": resumed.round if resumed else None,
        "stopped_early": stopped,
        **({} if s.private else {"seconds": seconds}),
        "federated_evaluation": FEDERATED_EVAL_OFF if s.private else "on",
        "privacy": {
            "randomness": randomness,
            "sample": ledger.sample_block(sample, s.sample.target_epsilon if s.sample else None),
            "user": user.block(ledger.rounds) if user else None,
        },
    })
    return writer.rows


def _budget_stop(s: ServerSettings, mech: Mechanisms, ledger: ParticipationLedger, r: int) -> Optional[str]:
    """Why round ``r`` must not run under ``privacy.max_epsilon`` (None if it may)."""
    if s.max_epsilon is None:
        return None
    checks = []
    if mech.user:
        checks.append(("user-level epsilon (models)", mech.user.epsilon(extra_rounds=1)))
        server_eps = ledger.user_server_epsilon(mech.user, extra=1)
        if server_eps is not None:
            checks.append(("user-level epsilon (server)", server_eps))
    if mech.sample:
        checks.append(("sample-level epsilon (a device in every round)", ledger.sample_epsilon(mech.sample, extra=1)))
    for what, eps in checks:
        if eps is not None and eps > s.max_epsilon:
            return f"round {r} would take {what} to {eps:.3f} > {s.max_epsilon}"
    return None


def _scores(row: RoundRow) -> dict[str, Optional[float]]:
    return {"wer": row.wer, "cer": row.cer, "raw_wer": row.raw_wer, "loops_cut": row.loops_cut,
            "device_wer": row.device_wer, "device_cer": row.device_cer}


def make_server_app(settings: ServerSettings) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, settings)

    return app
