"""The Flower ServerApp: the round loop, aggregation, evaluation, checkpoints and results.

Each round: sample a cohort of devices, send them the global model, average the weights they
send back (FedAvg), evaluate the new global model on held-out speakers (server side) and on every
device's local test split (federated evaluation), checkpoint it, and append a row to
``results.jsonl`` with the privacy spent so far.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from rich.progress import Progress

from fl import protocol as P
from fl.config import ModelConfig
from fl.data.text import CharTokenizer
from fl.model.conformer import ConformerCTC
from fl.train import evaluate as evaluate_model
from server import rounds
from server.aggregate import fedavg
from server.results import ResultsWriter, RoundRow

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
    sample_delta: Optional[float]
    sample_accountant: Optional[str]
    config: dict[str, Any]
    weighted: bool = True


def _wait_for_nodes(grid: Grid, wanted: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= wanted or time.monotonic() > deadline:
            return nodes
        time.sleep(1.0)


class _Privacy:
    """Tracks each device's cumulative sample-level epsilon as devices report it."""

    def __init__(self, delta: Optional[float]) -> None:
        self.delta = delta
        self.by_node: dict[int, dict[str, float]] = {}

    def update(self, replies: rounds.Replies) -> None:
        for m in replies.ok:
            metrics = m.content[P.METRICS]
            if P.EPSILON_SAMPLE in metrics:
                self.by_node[m.metadata.src_node_id] = {k: float(v) for k, v in metrics.items()}

    @property
    def epsilon(self) -> Optional[float]:
        if self.delta is None or not self.by_node:
            return None
        return max(r[P.EPSILON_SAMPLE] for r in self.by_node.values())

    def block(self, accountant: Optional[str]) -> Optional[dict[str, Any]]:
        """The summary's ``privacy.sample``: the figures of the device with the largest epsilon."""
        if not self.by_node:
            return None
        worst = max(self.by_node.values(), key=lambda r: r[P.EPSILON_SAMPLE])
        return {
            "noise_multiplier": worst[P.NOISE_MULTIPLIER], "max_grad_norm": worst[P.MAX_GRAD_NORM],
            "sample_rate": worst[P.SAMPLE_RATE], "max_steps": int(worst[P.DP_STEPS]),
            "epsilon": worst[P.EPSILON_SAMPLE], "delta": self.delta, "accountant": accountant,
        }


def run_server(grid: Grid, s: ServerSettings) -> list[RoundRow]:
    """Run ``s.rounds`` rounds of federated training; returns the rows written to results.jsonl."""
    out = Path(s.out_dir)
    tokenizer = CharTokenizer()
    model = ConformerCTC(s.model, tokenizer.vocab_size)
    model.load_state_dict(torch.load(s.initial_weights, weights_only=False)["state_dict"])
    eval_set = torch.load(s.eval_examples, weights_only=False)
    arrays = ArrayRecord(model.state_dict())
    writer = ResultsWriter(out)
    privacy = _Privacy(s.sample_delta)
    rng = random.Random(s.seed)
    nodes = _wait_for_nodes(grid, s.clients_per_round, s.round_timeout)
    if not nodes:
        raise RuntimeError("no devices connected: nothing to train on")
    log.info("%d devices available; %d per round", len(nodes), s.clients_per_round)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)

    def measure(r: int, started: float, replies: Optional[rounds.Replies], losses: list[float]) -> RoundRow:
        model.load_state_dict(arrays.to_torch_state_dict())
        central = evaluate_model(model, eval_set, tokenizer, s.model.n_mels)
        fed = rounds.evaluate(grid, nodes, arrays, r, s.round_timeout)
        dwer, dcer = rounds.pooled_error_rates(fed)
        torch.save({"round": r, "state_dict": model.state_dict()}, out / "checkpoints" / f"round-{r:03d}.pt")
        return RoundRow(
            round=r, wer=central.wer, cer=central.cer, loss=central.loss, device_wer=dwer, device_cer=dcer,
            train_loss=sum(losses) / len(losses) if losses else None,
            clients=len(replies.ok) if replies else 0, failures=len(replies.failed) if replies else 0,
            epsilon_sample=privacy.epsilon, epsilon_user=None,
            delta=s.sample_delta, seconds=time.perf_counter() - started,
        )

    with Progress() as progress:
        bar = progress.add_task("federated rounds", total=s.rounds)
        writer.append(measure(0, time.perf_counter(), None, []))
        for r in range(1, s.rounds + 1):
            started = time.perf_counter()
            cohort = sorted(rng.sample(nodes, min(s.clients_per_round, len(nodes))))
            replies = rounds.train(grid, cohort, arrays, r, s.round_timeout)
            privacy.update(replies)
            if replies.ok:
                weights = replies.metric(P.NUM_EXAMPLES) if s.weighted else None
                arrays = fedavg([m.content[P.ARRAYS] for m in replies.ok], weights)
            else:
                log.warning("round %d: no device returned an update; the global model is unchanged", r)
            row = measure(r, started, replies, replies.metric(P.TRAIN_LOSS))
            writer.append(row)
            log.info("round %d: WER %.3f device WER %s eps %s (%d ok, %d failed, %.1fs)", r, row.wer,
                     row.device_wer, row.epsilon_sample, row.clients, row.failures, row.seconds)
            progress.update(bar, advance=1, description=f"round {r}: WER {row.wer:.3f}")
    seed, final = writer.rows[0], writer.rows[-1]
    writer.write_summary({
        "config": s.config,
        "seed_model": _scores(seed),
        "final": _scores(final),
        "rounds": final.round,
        "seconds": sum(row.seconds for row in writer.rows),
        "privacy": {"sample": privacy.block(s.sample_accountant), "user": None},
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
