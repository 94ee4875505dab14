"""One training round under secure aggregation: the server learns the cohort's SUM, never an update.

``secure_sum`` runs Flower's SecAgg+ protocol (``flwr.server.workflow.SecAggPlusWorkflow``) over a
cohort: setup (devices send public keys), share-keys (each device Shamir-shares its mask seed and
key among its ``num_shares`` neighbours, encrypted for them), collect-masked-vectors (devices train
-- the ordinary ClientApp ``train`` runs here -- and send their quantised update plus a private mask
and pairwise masks that cancel in the sum), unmask (surviving devices send the shares needed to
remove the private masks of contributors and the pairwise masks of dropped devices). Devices need
``clients/secure_app.py``'s mods around their train function.

Trust and threat model (what "the server learns only the sum" rests on):
  * The server is honest-but-curious: it runs this code as written but may inspect everything it
    receives. Flower's SecAgg+ has no consistency-check round, so a *malicious* server that tells
    some neighbours a device dropped and others that it survived can reconstruct that device's
    update. Not covered.
  * Collusion and dropout: a device's mask seed and key are split into ``num_shares`` shares (the
    device plus its neighbours), any ``threshold`` of which reconstruct them. The server (with up to
    ``threshold - 1`` colluding devices in any neighbourhood) cannot unmask a single update; a
    device reveals shares only if at least ``threshold`` of its neighbours are reported active, so
    any sum the server can decode covers at least ``threshold`` contributors (``min_contributors``
    here). Up to ``num_shares - threshold`` devices of a neighbourhood may drop and the round still
    succeeds; devices that drop before sending their masked vector are simply not in the sum.
  * Distributed DP therefore needs each device to add noise std z*C / sqrt(noise cohort) with the
    noise cohort <= ``min_contributors``: then the decodable sum carries noise of std >= z*C.
    Colluding devices that reveal their own noise reduce that: against k colluders the guarantee
    needs noise cohort <= min_contributors - k.
  * Flower 1.42 derives every mask from a 32-bit seed (``pseudo_rand_gen``); this module and
    ``clients/secure_app.py`` replace that generator on import with ChaCha20 keyed by the whole
    seed (``fl/privacy/masks.py``), so masks are as hard to find as the key agreement is to break.
  * Quantisation and range clipping happen on the device before summation (``fl/privacy/secagg.py``):
    the decoded sum is sum_i Q(clip_R(update_i)), within ``m * 2R / Q`` per coordinate of the true
    sum for m contributors; R must be chosen so no coordinate is range-clipped
    (``clipping_range_for``).
  * Per-device scalar metrics travel in clear, as in ordinary rounds: under privacy they are only
    the echo of the public mechanism parameters (``clients/guard.py``); only the arrays are
    aggregated securely. Weights are forced to 1: the result is the unweighted sum.
  * The server distrusts the decoded sum: ``fl.privacy.user.UserLevel.check_total`` must accept it
    (finite, within the norm of honest clipped and noised updates) or the round releases nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import FitIns, FitRes, Parameters, parameters_to_ndarrays
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid
from torch import Tensor

from fl import protocol as P
from fl.privacy import masks
from fl.privacy.secagg import MODULUS_RANGE, SECURE_NAMES, quantization_range_for

log = logging.getLogger(__name__)

masks.install()


@dataclass
class SecureSum:
    """A secure round's outcome: the sum only, who is in it, and the scalars devices sent in clear."""

    total: Optional[dict[str, Tensor]]  # float64, by parameter name; None if the protocol halted
    contributed: list[int] = field(default_factory=list)  # nodes whose update is in ``total``
    failed: list[int] = field(default_factory=list)  # sampled nodes not in ``total``
    metrics: dict[int, dict[str, Union[int, float]]] = field(default_factory=dict)  # per contributor
    step: float = 0.0  # quantisation step 2R/Q: |total - true sum| <= len(contributed) * step


def update_names(arrays: ArrayRecord) -> list[str]:
    """The entries a device's update covers, in wire order: the floating-point ones (``model_delta``)."""
    return [k for k, a in arrays.items() if np.dtype(a.dtype).kind == "f"]


class _SumStrategy(Strategy):
    """The minimal legacy Strategy SecAggPlusWorkflow drives: hand out FitIns, keep the decoded sum."""

    def __init__(self, proxies: list[ClientProxy], config: dict[str, Any]) -> None:
        self.proxies, self.config = proxies, config
        self.results: list[tuple[ClientProxy, FitRes]] = []

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        return [(p, FitIns(parameters, dict(self.config))) for p in self.proxies]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Optional[Parameters], dict[str, Any]]:
        self.results = results  # every FitRes carries the same decoded (weighted-average) vector
        return None, {}

    def initialize_parameters(self, client_manager: ClientManager) -> None:
        return None

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: ClientManager) -> list:
        return []

    def aggregate_evaluate(self, server_round: int, results: list, failures: list) -> tuple[None, dict]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> None:
        return None


def secure_sum(
    grid: Grid, nodes: list[int], arrays: ArrayRecord, server_round: int, config: dict[str, Any],
    timeout: Optional[float], *, clipping_range: float, min_contributors: int,
    num_shares: Union[int, float] = 1.0, noise_cohort: int = 0,
) -> SecureSum:
    """Send ``arrays`` and ``config`` to ``nodes``, let them train, and learn only the sum of their updates.

    ``clipping_range``: R, a bound on every coordinate of every update (``clipping_range_for``).
    ``min_contributors``: SecAgg+'s reconstruction threshold t (>= 3): no sum of fewer than t
    devices can be decoded; under distributed DP pass the devices' noise cohort here and as
    ``noise_cohort`` (which may not exceed it). ``num_shares``: neighbourhood size; 1.0 = every device of the
    cohort (plain SecAgg, the strongest; cost grows with cohort^2). ``timeout`` applies to each of
    the four stages. A halted protocol (too few devices, too many dropouts) returns ``total=None``.
    ``server_round`` is the protocol messages' group id and must grow from call to call: devices
    refuse messages of a round older than one they have seen (``clients.secure_app.stale_round_guard``).
    """
    if isinstance(min_contributors, bool) or not isinstance(min_contributors, int) or min_contributors < 3:
        raise ValueError(f"min_contributors must be an integer >= 3, got {min_contributors!r}")
    if noise_cohort > min_contributors:
        raise ValueError(f"noise cohort {noise_cohort} exceeds min_contributors {min_contributors}: "
                         "a decodable sum could carry less than the accounted noise")
    if not clipping_range > 0:
        raise ValueError(f"clipping_range must be > 0, got {clipping_range!r}")
    names = update_names(arrays)
    q = quantization_range_for(len(nodes))
    if len(nodes) < min_contributors:
        log.warning("round %d: cohort of %d is below the %d secure aggregation needs; nothing aggregated",
                    server_round, len(nodes), min_contributors)
        return SecureSum(None, [], list(nodes), {}, 2 * clipping_range / q)
    workflow = SecAggPlusWorkflow(
        num_shares=num_shares, reconstruction_threshold=min_contributors,
        max_weight=1.0,  # devices send num_examples = 1: weight exactly 1, the decoded vector is the mean
        clipping_range=float(clipping_range), quantization_range=q, modulus_range=MODULUS_RANGE, timeout=timeout,
    )
    strategy = _SumStrategy([GridClientProxy(n, grid, 0) for n in nodes],
                            {**config, P.ROUND: server_round, SECURE_NAMES: list(arrays.keys())})
    state = RecordDict({MAIN_CONFIGS_RECORD: ConfigRecord({Key.CURRENT_ROUND: server_round}),
                        MAIN_PARAMS_RECORD: arrays})
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=state, run_config={}),
                            strategy=strategy)
    workflow(grid, context)
    out = SecureSum(None, step=2 * clipping_range / q)
    for proxy, fitres in strategy.results:
        node = int(proxy.node_id)  # type: ignore[attr-defined]
        out.contributed.append(node)
        out.metrics[node] = {k: v for k, v in fitres.metrics.items() if isinstance(v, (int, float))}
    out.failed = [n for n in nodes if n not in out.metrics]
    if strategy.results:
        mean = parameters_to_ndarrays(strategy.results[0][1].parameters)
        if len(mean) != len(names):
            raise RuntimeError(f"decoded {len(mean)} arrays, expected {len(names)} ({names})")
        m = len(strategy.results)
        out.total = {k: torch.from_numpy(a * m).to(torch.float64) for k, a in zip(names, mean)}
    else:
        log.warning("round %d: secure aggregation halted; nothing aggregated", server_round)
    return out
