"""A device's own record of the rounds it trained in: ``rounds.jsonl`` in its state folder.

The device appends a line (round, DP-SGD steps, utterances held) after training and before it
replies, so the record holds even when the reply is lost. It never leaves the device; it lets the
device's owner see when their data was used, and lets a simulation's leakage audit know which
devices' utterances are members of the final model's training set.
"""

from __future__ import annotations

import json
from pathlib import Path

HISTORY = "rounds.jsonl"


def append_round(state_dir: Path, server_round: int, steps: int, utterances: int) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / HISTORY, "a", encoding="utf-8") as f:
        f.write(json.dumps({"round": server_round, "steps": steps, "utterances": utterances}) + "\n")
        f.flush()


def rounds_trained(state_dir: Path) -> list[int]:
    """The rounds this device trained in (empty if it never did)."""
    path = state_dir / HISTORY
    if not path.exists():
        return []
    return [json.loads(line)["round"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
