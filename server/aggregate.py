"""One training round: send the global model, check every reply, combine what passes.

``plain_round``: devices reply in clear; each reply is checked (``server/rounds.py``: the model's
entries, shapes, dtypes, finite values, example counts; the echoed mechanism parameters;
``UserLevel``'s re-clipping or norm bound, or the most AdamW can move the weights without
user-level clipping) and dropped with its reason if it fails; the rest are averaged by
example-weighted FedAvg (no privacy), their mean (sample-level DP) or ``UserLevel.aggregate``.
Under DP-FedSGD (``privacy.sample.noise=central``) every reply is a device's clipped gradient sum,
projected onto the sum cap, and the noised total is divided by the public expected batch
(``SampleLevel.aggregate``). ``secure_round``: distributed noise (user level, or DP-FedSGD), where
SecAgg+ reveals only the sum, which is checked in turn. Both return the round's mean update (None:
nothing to apply), which the server optimizer (``server/optimizer.py``) turns into the new global
model, the round's outcome and the keys of the devices that declined.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid

from fl import protocol as P
from fl.config import TrainConfig
from fl.privacy.gaussian import update_norm
from fl.privacy.randomness import Secret
from fl.privacy.sample import SampleLevel
from fl.privacy.secagg import clipping_range_for
from fl.privacy.user import UserLevel
from fl.train import max_update_norm
from server import rounds
from server.devices import Devices
from server.rounds import Rejected, check_update, example_weight
from server.secure_round import secure_sum

log = logging.getLogger(__name__)


def fedavg(updates: Sequence[ArrayRecord], weights: Sequence[float] | None = None) -> ArrayRecord:
    """Weighted mean of the devices' updates (or weights) (unweighted when ``weights`` is None)."""
    if not updates:
        raise ValueError("fedavg needs at least one update")
    w = torch.tensor(weights if weights is not None else [1.0] * len(updates), dtype=torch.float64)
    if len(w) != len(updates) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError(f"bad aggregation weights {list(w.tolist())} for {len(updates)} updates")
    w = w / w.sum()
    states = [u.to_torch_state_dict() for u in updates]
    keys = list(states[0])
    for s in states[1:]:
        if list(s) != keys or any(s[k].shape != states[0][k].shape for k in keys):
            raise ValueError("updates disagree on the model's arrays or shapes")
    out = {}
    for k in keys:
        ref = states[0][k]
        acc = sum(float(wi) * s[k].to(torch.float64) for wi, s in zip(w, states))
        out[k] = acc.to(ref.dtype)
    return ArrayRecord(out)


@dataclass
class RoundOutcome:
    """How one training round went: updates aggregated, devices that declined, failed, or were rejected."""

    updates: int = 0
    declined: int = 0
    failures: int = 0
    rejected: int = 0
    train_loss: Optional[float] = None


@dataclass
class Mechanisms:
    """The run's privacy mechanisms (None = that level is off), the server's secret and the run's nonce."""

    sample: Optional[SampleLevel]
    user: Optional[UserLevel]
    secret: Secret
    nonce: str = ""

    @property
    def private(self) -> bool:
        return self.sample is not None or self.user is not None

    @property
    def secure(self) -> bool:
        """Distributed noise at either level: the round runs under SecAgg+ and devices never replay a reply."""
        return bool((self.user and self.user.secure) or (self.sample and self.sample.noise == "distributed"))

    def device_config(self) -> dict[str, Any]:
        """The exact parameters devices must use this round (they echo them back), and the run's nonce
        (part of the request's identity on the device: never echoed)."""
        out: dict[str, Any] = {P.RUN_NONCE: self.nonce} if self.nonce else {}
        if self.sample:
            out |= self.sample.to_config()
        if self.user:
            out |= self.user.round().to_config()
        return out

    def check_echo(self, metrics: Any) -> None:
        try:
            if self.sample:
                self.sample.check_echo(metrics)
            if self.user:
                self.user.round().check_echo(metrics)
        except ValueError as err:
            raise Rejected(str(err)) from None


def _is_declined(m: Message) -> bool:
    return P.ARRAYS not in m.content and bool(m.content[P.METRICS].get(P.DECLINED))


Round = tuple[Optional[dict[str, torch.Tensor]], RoundOutcome, list[int]]
"""What a round returns: the mean update the server optimizer steps with (None: the model stays), the
outcome, and the keys of the devices that validly declined."""


def plain_round(
    grid: Grid, mech: Mechanisms, devices: Devices, cohort: list[int], arrays: ArrayRecord, r: int,
    timeout: float, train: TrainConfig,
) -> Round:
    """Devices reply in clear; each reply is checked, then FedAvg'd, averaged privately (user level) or,
    under DP-FedSGD with central noise, its clipped sum added to the noised total."""
    replies = rounds.train(grid, devices.nodes(cohort), arrays, r, timeout, mech.device_config(),
                           devices.key_of)
    reference = arrays.to_torch_state_dict()
    outcome = RoundOutcome(failures=len(replies.failed))
    updates: list[dict[str, torch.Tensor]] = []
    weights, bits, losses, declined = [], [], [], []
    bound = max_update_norm(train, reference)
    for m in replies.ok:
        key = devices.key_of(m.metadata.src_node_id)
        if _is_declined(m):
            log.info("round %d: device %s declined: %s", r, key, P.decline_reason(m.content[P.METRICS][P.DECLINED]))
            declined.append(key)
            continue
        try:
            if P.ARRAYS not in m.content:
                raise Rejected("a reply with neither an update nor a declined flag")
            metrics = m.content[P.METRICS]
            mech.check_echo(metrics)
            update = check_update(m.content[P.ARRAYS], reference)
            if mech.sample and mech.sample.aggregated:
                update = mech.sample.check_contribution(update)
            elif mech.user:
                try:
                    update = mech.user.check_update(update)
                except ValueError as err:
                    raise Rejected(str(err)) from None
                if mech.user.adaptive:
                    bit = metrics.get(P.CLIP_BIT)
                    if bit not in (0, 0.0, 1, 1.0):
                        raise Rejected(f"clip bit {bit!r} is not 0 or 1")
                    bits.append(float(bit))  # type: ignore[arg-type]
            elif (norm := update_norm(update)) > bound:
                raise Rejected(f"update norm {norm:.4g} is above {bound:.4g}, the most "
                               f"{train.local_steps} AdamW steps at lr {train.lr} can move the weights")
            weight = example_weight(metrics) if not mech.private else 1.0
        except Exception as err:  # noqa: BLE001 -- the trust boundary: whatever a reply holds, it never crashes a round
            log.warning("round %d: dropped the reply of device %s: %s", r, key, err)
            outcome.rejected += 1
            continue
        updates.append(update)
        weights.append(weight)
        if not mech.private and isinstance(metrics.get(P.TRAIN_LOSS), float):
            losses.append(float(metrics[P.TRAIN_LOSS]))  # type: ignore[arg-type]
    outcome.updates, outcome.declined = len(updates), len(declined)
    outcome.train_loss = sum(losses) / len(losses) if losses else None
    if mech.sample and mech.sample.aggregated:  # a round with no contribution still releases the noise
        return mech.sample.aggregate(updates, reference, mech.secret, r), outcome, declined
    if mech.user:
        return mech.user.aggregate(updates, reference, bits, mech.secret, r), outcome, declined
    if updates:
        return fedavg([ArrayRecord(u) for u in updates], weights).to_torch_state_dict(), outcome, declined
    log.warning("round %d: no usable update; the global model is unchanged", r)
    return None, outcome, declined


def secure_round(
    grid: Grid, mech: Mechanisms, devices: Devices, cohort: list[int], arrays: ArrayRecord, r: int,
    timeout: float, train: TrainConfig,
) -> Round:
    """Distributed noise: SecAgg+ reveals only the sum of the noised updates (user level) or of the
    noised clipped sums (DP-FedSGD), which is checked and averaged.

    (``train`` is unused: the signature is ``plain_round``'s, so the server calls either alike.)

    A sum that is not finite, exceeds the norm of honest contributions, or comes with a wrong echo of
    the parameters releases nothing (the model is unchanged) and the round is still accounted."""
    reference = arrays.to_torch_state_dict()
    numel = sum(v.numel() for v in reference.values() if v.is_floating_point())
    devices_in = max(1, len(cohort))
    if mech.sample and mech.sample.aggregated:
        level: Any = mech.sample
        noise_cohort = mech.sample.noise_cohort
        value_range = clipping_range_for(mech.sample.sum_cap, mech.sample.device_std, numel, devices_in)
    else:
        assert mech.user is not None
        level, this = mech.user, mech.user.round()
        noise_cohort = this.noise_cohort
        value_range = clipping_range_for(this.clip_norm, this.device_std, numel, devices_in)
    result = secure_sum(grid, devices.nodes(cohort), arrays, r, mech.device_config(), timeout,
                        clipping_range=value_range, min_contributors=noise_cohort, noise_cohort=noise_cohort)
    declined = [devices.key_of(n) for n, m in result.metrics.items() if m.get(P.DECLINED)]
    outcome = RoundOutcome(updates=len(result.contributed) - len(declined), declined=len(declined),
                           failures=len(result.failed))
    total = result.total
    try:
        for metrics in result.metrics.values():
            mech.check_echo(metrics)
        if total is not None:
            level.check_total(total, len(result.contributed), result.step)
    except ValueError as err:
        log.warning("round %d: the secure sum releases nothing: %s", r, err)
        outcome.rejected, outcome.updates, total = outcome.updates, 0, None
    if total is None:
        if mech.user:
            mech.user.record_round()  # the devices' noised shares were decoded or lost: account the round anyway
        return None, outcome, declined
    if mech.sample and mech.sample.aggregated:
        return mech.sample.aggregate([total], reference, mech.secret, r), outcome, declined
    assert mech.user is not None
    return mech.user.aggregate([total], reference, [], mech.secret, r), outcome, declined
