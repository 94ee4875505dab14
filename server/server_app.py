"""The Flower ServerApp: the round loop, aggregation, evaluation, checkpoints and results.

Each round: sample devices (Poisson by default), send them the global model, combine the updates
they send back (example-weighted FedAvg, or the user-level DP average of ``server/user_dp.py``),
evaluate the new global model on held-out speakers (server side) and, every ``device_eval_every``
rounds and after the last, on the devices' local test splits (federated evaluation; all devices,
or ``eval_devices`` of them drawn afresh each time), checkpoint
it, and append a row to ``results.jsonl`` with the privacy spent so far. A user-level budget
(``max_epsilon``) stops the run before a round that would exceed it. Every round is committed to
``checkpoints/server-state.pt`` before it is published, and ``resume`` continues from there
(``server/checkpoint.py``).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from rich.progress import Progress

from fl import protocol as P
from fl.config import Config, ModelConfig, UserPrivacyConfig
from fl.data.text import CharTokenizer
from fl.model.conformer import ConformerCTC
from fl.privacy.secagg import clipping_range_for
from fl.privacy.user import noise_std_per_device
from fl.train import evaluate as evaluate_model
from server import checkpoint, rounds
from server.aggregate import fedavg
from server.devices import Devices, identify
from server.ledger import SampleLedger
from server.results import ResultsWriter, RoundRow
from server.sampling import participation_rate, sample_cohort
from server.secure_round import secure_sum
from server.user_dp import UserLevelDP

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerSettings:
    out_dir: str
    rounds: int
    clients_per_round: int
    round_timeout: float
    seed: int
    model: ModelConfig
    initial_weights: str
    eval_examples: str
    config: dict[str, Any]
    sampling: str = "poisson"
    sample_delta: Optional[float] = None
    sample_accountant: Optional[str] = None
    user: Optional[UserPrivacyConfig] = None
    max_epsilon: Optional[float] = None
    device_eval_every: int = 1
    eval_devices: int = 0
    resume: bool = False

    @classmethod
    def from_config(cls, cfg: Config, resolved: dict[str, Any], out_dir: str, initial_weights: str,
                    eval_examples: str) -> "ServerSettings":
        """The server's part of a run's config (``resolved`` is recorded in the summary and checkpoint)."""
        sample, fed = cfg.privacy.sample, cfg.federation
        return cls(
            out_dir=out_dir, rounds=fed.rounds, clients_per_round=fed.clients_per_round,
            round_timeout=fed.round_timeout, seed=cfg.seed, model=cfg.model, initial_weights=initial_weights,
            eval_examples=eval_examples, config=resolved, sampling=fed.sampling,
            sample_delta=sample.delta if sample else None, sample_accountant=sample.accountant if sample else None,
            user=cfg.privacy.user, max_epsilon=cfg.privacy.max_epsilon, device_eval_every=fed.device_eval_every,
            eval_devices=fed.eval_devices, resume=cfg.resume,
        )


def _wait_for_nodes(grid: Grid, wanted: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= wanted or time.monotonic() > deadline:
            return nodes
        time.sleep(1.0)


def _apply(arrays: ArrayRecord, update: dict[str, torch.Tensor]) -> ArrayRecord:
    state = arrays.to_torch_state_dict()
    return ArrayRecord({k: v + update[k].to(v.dtype) if k in update else v for k, v in state.items()})


@dataclass
class RoundOutcome:
    """How one training round went: updates aggregated, devices that declined or failed."""

    updates: int = 0
    declined: int = 0
    failures: int = 0
    losses: list[float] = field(default_factory=list)
    device_seconds: float = 0.0


def _plain_round(
    grid: Grid, s: ServerSettings, user: Optional[UserLevelDP], ledger: SampleLedger, devices: Devices,
    cohort: list[int], arrays: ArrayRecord, r: int, extra: dict[str, Any],
) -> tuple[ArrayRecord, RoundOutcome]:
    """Devices reply with their updates in clear; FedAvg them, or average them privately (user-level)."""
    replies = rounds.train(grid, devices.nodes(cohort), arrays, r, s.round_timeout, extra)
    ledger.update(replies, devices.key_of)
    usable = [m for m in replies.ok if P.ARRAYS in m.content]
    updates = [m.content[P.ARRAYS].to_torch_state_dict() for m in usable]
    if user:
        bits = [float(m.content[P.METRICS][P.CLIP_BIT]) for m in usable if P.CLIP_BIT in m.content[P.METRICS]]
        arrays = _apply(arrays, user.aggregate(updates, arrays.to_torch_state_dict(), bits))
    elif usable:
        weights = [float(m.content[P.METRICS][P.NUM_EXAMPLES]) for m in usable]
        arrays = _apply(arrays, fedavg([m.content[P.ARRAYS] for m in usable], weights).to_torch_state_dict())
    else:
        log.warning("round %d: no device returned an update; the global model is unchanged", r)
    return arrays, RoundOutcome(len(usable), len(replies.ok) - len(usable), len(replies.failed),
                                replies.metric(P.TRAIN_LOSS), sum(replies.metric(P.SECONDS)))


def _secure_round(
    grid: Grid, s: ServerSettings, user: UserLevelDP, ledger: SampleLedger, devices: Devices,
    cohort: list[int], arrays: ArrayRecord, r: int, extra: dict[str, Any],
) -> tuple[ArrayRecord, RoundOutcome]:
    """Distributed noise: SecAgg+ reveals only the sum of the noised updates, which is averaged."""
    reference = arrays.to_torch_state_dict()
    numel = sum(v.numel() for v in reference.values() if v.is_floating_point())
    std = noise_std_per_device("distributed", user.z_update, user.clip_norm, user.cfg.secure_threshold)
    result = secure_sum(grid, devices.nodes(cohort), arrays, r, extra, s.round_timeout,
                        clipping_range=clipping_range_for(user.clip_norm, std, numel, max(1, len(cohort))),
                        min_contributors=user.cfg.secure_threshold)
    for node, metrics in result.metrics.items():
        ledger.report(devices.key_of(node), metrics)
    arrays = _apply(arrays, user.aggregate([result.total] if result.total is not None else [], reference, []))
    declined = sum(1 for m in result.metrics.values() if m.get(P.DECLINED))
    seconds = sum(float(m[P.SECONDS]) for m in result.metrics.values() if P.SECONDS in m)
    return arrays, RoundOutcome(len(result.contributed) - declined, declined, len(result.failed),
                                device_seconds=seconds)


def _evaluated(keys: list[int], cap: int, seed: int, r: int) -> list[int]:
    """The devices of round ``r``'s federated evaluation: all, or ``cap`` of them drawn by (seed, round)."""
    if cap <= 0 or cap >= len(keys):
        return keys
    return sorted(random.Random(f"unheard-eval:{seed}:{r}").sample(keys, cap))


def run_server(grid: Grid, s: ServerSettings) -> list[RoundRow]:
    """Run up to ``s.rounds`` rounds of federated training; returns the rows written to results.jsonl."""
    out = Path(s.out_dir)
    resumed = checkpoint.resumable(out, s.config) if s.resume else None
    tokenizer = CharTokenizer()
    model = ConformerCTC(s.model, tokenizer.vocab_size)
    model.load_state_dict(torch.load(s.initial_weights, weights_only=False)["state_dict"])
    eval_set = torch.load(s.eval_examples, weights_only=False)
    arrays = ArrayRecord(model.state_dict())
    writer = ResultsWriter(out)
    ledger = SampleLedger(s.sample_delta, s.sample_accountant)
    rng = random.Random(s.seed)
    nodes = _wait_for_nodes(grid, s.clients_per_round, s.round_timeout)
    if not nodes:
        raise RuntimeError("no devices connected: nothing to train on")
    devices = identify(grid, nodes, s.round_timeout)
    participation = participation_rate(s.clients_per_round, len(nodes))
    user = (UserLevelDP(s.user, len(nodes), s.clients_per_round, s.sampling, s.rounds, s.seed)
            if s.user else None)
    log.info("%d devices, %s sampling of %d a round (q = %.3f)", len(nodes), s.sampling, s.clients_per_round,
             participation)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    stopped: Optional[str] = None

    def measure(r: int, started: float, outcome: Optional[RoundOutcome]) -> RoundRow:
        model.load_state_dict(arrays.to_torch_state_dict())
        central = evaluate_model(model, eval_set, tokenizer, s.model.n_mels)
        dwer = dcer = None
        if r == s.rounds or (s.device_eval_every > 0 and r % s.device_eval_every == 0):
            fed = rounds.evaluate(grid, devices.nodes(_evaluated(devices.keys, s.eval_devices, s.seed, r)), arrays, r,
                                  s.round_timeout, {})
            ledger.update(fed, devices.key_of)
            dwer, dcer = rounds.pooled_error_rates(fed)
        o = outcome or RoundOutcome()
        return RoundRow(
            round=r, wer=central.wer, cer=central.cer, loss=central.loss, device_wer=dwer, device_cer=dcer,
            train_loss=sum(o.losses) / len(o.losses) if o.losses else None,
            clients=o.updates, declined=o.declined, failures=o.failures,
            epsilon_sample=ledger.epsilon, epsilon_user=user.epsilon() if user else None,
            delta=s.sample_delta if s.sample_delta is not None else (user.cfg.delta if user else None),
            delta_user=user.cfg.delta if user else None,
            seconds=time.perf_counter() - started, device_seconds=o.device_seconds,
        )

    def commit(row: RoundRow) -> None:
        """Checkpoint the server's whole state, then publish the round (model checkpoint, results row)."""
        rows = [asdict(r) for r in writer.rows] + [asdict(row)]
        checkpoint.save(out, checkpoint.ServerState(
            round=row.round, arrays=arrays.to_torch_state_dict(), rng=rng.getstate(), rows=rows,
            sample=ledger.state_dict(), user=user.state_dict() if user else None, config=s.config))
        publish(row)

    def publish(row: RoundRow) -> None:
        torch.save({"round": row.round, "state_dict": arrays.to_torch_state_dict()},
                   out / "checkpoints" / f"round-{row.round:03d}.pt")
        writer.append(row)

    if resumed is None:
        commit(measure(0, time.perf_counter(), None))
        first = 1
    else:
        arrays = ArrayRecord(resumed.arrays)
        rng.setstate(resumed.rng)
        ledger.load_state_dict(resumed.sample)
        if user and resumed.user:
            user.load_state_dict(resumed.user)
        rows = [RoundRow(**r) for r in resumed.rows]
        writer.restore(rows[:-1])
        publish(rows[-1])  # again: the interruption may have come between commit and publish
        first = resumed.round + 1
        log.info("resuming after round %d of %d from %s", resumed.round, s.rounds, checkpoint.state_path(out))
    with Progress() as progress:
        bar = progress.add_task("federated rounds", total=s.rounds, completed=first - 1)
        for r in range(first, s.rounds + 1):
            if user and s.max_epsilon is not None and user.epsilon(r) > s.max_epsilon:
                stopped = f"round {r} would take user-level epsilon to {user.epsilon(r):.3f} > {s.max_epsilon}"
                log.warning("budget stop: %s", stopped)
                break
            started = time.perf_counter()
            cohort = sample_cohort(devices.keys, s.clients_per_round, s.sampling, rng)
            extra = {P.PLANNED_ROUNDS: s.rounds, P.PARTICIPATION: participation}
            if user:
                extra |= user.device_config()
            ledger.sent_training(cohort)
            if user and user.secure:
                arrays, outcome = _secure_round(grid, s, user, ledger, devices, cohort, arrays, r, extra)
            else:
                arrays, outcome = _plain_round(grid, s, user, ledger, devices, cohort, arrays, r, extra)
            trained = time.perf_counter()
            row = measure(r, started, outcome)
            measured = time.perf_counter()
            commit(row)
            log.info("round %d: %.2f s with the devices (their training: %.2f s in all), %.2f s evaluating, "
                     "%.2f s checkpointing", r, trained - started, outcome.device_seconds, measured - trained,
                     time.perf_counter() - measured)
            log.info("round %d: WER %.3f, device WER %s, eps sample %s user %s (%d updates, %d declined, %d failed)",
                     r, row.wer, row.device_wer, row.epsilon_sample, row.epsilon_user, row.clients, row.declined,
                     row.failures)
            progress.update(bar, advance=1, description=f"round {r}: WER {row.wer:.3f}")
    seed, final = writer.rows[0], writer.rows[-1]
    writer.write_summary({
        "config": s.config,
        "seed_model": _scores(seed),
        "final": _scores(final),
        "rounds": final.round,
        "resumed_after": resumed.round if resumed else None,
        "stopped_early": stopped,
        "seconds": sum(row.seconds for row in writer.rows),
        "privacy": {"sample": ledger.block(), "user": user.block() if user else None},
    })
    return writer.rows


def _scores(row: RoundRow) -> dict[str, Optional[float]]:
    return {"wer": row.wer, "cer": row.cer, "device_wer": row.device_wer, "device_cer": row.device_cer}


def make_server_app(settings: ServerSettings) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, settings)

    return app
