"""Which devices take part in a round.

``poisson``: every device joins independently with probability q = expected / population -- the
sampling that the amplification-by-subsampling theorem for user-level DP assumes.
``fixed``: exactly ``expected`` devices drawn without replacement; the user-level accountant then
claims no amplification (see ``fl/privacy/accounting.py``).
The coins come from the server's secret ChaCha20 stream for the round (``Secret.stream(COHORT,
round)``): who was sampled is not derivable from the config, which amplification by sampling needs.
"""

from __future__ import annotations

from fl.privacy.randomness import Stream

SCHEMES = ("poisson", "fixed")


def participation_rate(expected: int, population: int) -> float:
    if population < 1 or expected < 1:
        raise ValueError(f"need at least one device and a cohort of at least 1 (got {population}, {expected})")
    return min(1.0, expected / population)


def sample_cohort(nodes: list[int], expected: int, scheme: str, stream: Stream) -> list[int]:
    """The devices of one round (possibly none under Poisson sampling), coins from ``stream``."""
    if scheme == "poisson":
        q = participation_rate(expected, len(nodes))
        return [nodes[i] for i in stream.coins(len(nodes), q)]
    if scheme == "fixed":
        return sorted(stream.choose(nodes, min(expected, len(nodes))))
    raise ValueError(f"unknown federation.sampling={scheme!r}; expected one of {SCHEMES}")
