import os
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import torch

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

from fl import protocol as P
from fl.config import ModelConfig
from fl.data.features import Example
from fl.data.fleet import DeviceData
from fl.data.text import CharTokenizer
from fl.model.conformer import ConformerCTC, ConformerRecognizer

SLOW_FIXTURES = {"sim_cache", "smoke_run", "private_run", "local_run", "central_run", "secure_run", "deployment",
                 "ray_head"}
"""Fixtures that run a simulation or a deployment: a test using one is marked ``slow``."""


def pytest_collection_modifyitems(config, items):
    """Mark every end-to-end test (one that needs a simulation or a deployment) as ``slow``:
    ``make test-fast`` (``pytest -m "not slow"``) runs the rest in about three minutes."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


TINY = ModelConfig(n_mels=16, d_model=32, layers=2, heads=2, ff_mult=2, conv_kernel=5, subsample=3, dropout=0.0)


@pytest.fixture
def tokenizer() -> CharTokenizer:
    return CharTokenizer()


@pytest.fixture
def conformer() -> ConformerRecognizer:
    """The Conformer-CTC recognizer with the :data:`TINY` shape (features: 16 log-mel bands)."""
    return ConformerRecognizer(TINY)


def fake_examples(n: int, seed: int = 0, n_mels: int = 16) -> list[Example]:
    """Random-feature examples of varied lengths with real transcripts (for model/optimizer tests)."""
    rng = random.Random(seed)
    tok = CharTokenizer()
    words = ["turn", "on", "the", "lights", "play", "music", "call", "mom", "set", "a", "timer"]
    out = []
    for i in range(n):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 3)))
        frames = rng.randint(40, 90)
        g = torch.Generator().manual_seed(seed * 1000 + i)
        feats = torch.randn(frames, n_mels, generator=g).to(torch.float16)
        out.append(Example(f"u{i:03d}", f"s{i % 3}", feats, torch.tensor(tok.encode(text)), text, frames / 100))
    return out


@pytest.fixture
def examples() -> list[Example]:
    return fake_examples(12)


@dataclass
class OneDevice:
    """A device store for ``clients.client_app._train``: fixed recordings (all training), a state folder."""

    root: Path
    examples: list
    key_: int = 7
    name: str = "d"

    def data(self, context: Context) -> DeviceData:
        return DeviceData(self.name, self.examples, [])

    def state(self, context: Context) -> Path:
        return self.root

    def key(self, context: Context) -> int:
        return self.key_


def tiny_global() -> ArrayRecord:
    """The :data:`TINY` Conformer's weights at seed 0: the global model of a hand-made train message."""
    torch.manual_seed(0)
    return ArrayRecord(ConformerCTC(TINY, CharTokenizer().vocab_size).state_dict())


def train_message(server_round: int, config: dict, arrays: Optional[ArrayRecord] = None,
                  nonce: Optional[str] = None) -> tuple[Message, Context]:
    """A server's train message for ``server_round`` (``config`` plus the round and, if given, the run
    nonce; ``arrays``: the global model, :func:`tiny_global` by default) and the device's context."""
    meta = Metadata(run_id=1, message_id=f"m{server_round}", src_node_id=0, dst_node_id=5, reply_to_message_id="",
                    group_id=str(server_round), created_at=time.time(), ttl=600.0, message_type=MessageType.TRAIN)
    record = ConfigRecord({P.ROUND: server_round, **({} if nonce is None else {P.RUN_NONCE: nonce}), **config})
    content = RecordDict({P.ARRAYS: tiny_global() if arrays is None else arrays, P.CONFIG: record})
    return Message(content=content, metadata=meta), Context(run_id=1, node_id=5, node_config={}, state=RecordDict(),
                                                           run_config={})


@pytest.fixture(scope="session")
def sim_cache(tmp_path_factory):
    """One corpus/feature/seed-model cache shared by every end-to-end simulation of a test session."""
    return tmp_path_factory.mktemp("sim-cache")


ROOT = Path(__file__).resolve().parents[1]


def listening(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    with socket.socket() as sock:
        return sock.connect_ex((host, port)) == 0


def run_entry(module: str, out: Path, cache: Path, *overrides: str) -> Path:
    """Run a Hydra entry point (``experiments.simulate``/``experiments.central``) with the smoke preset."""
    env = dict(os.environ, FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    cmd = [sys.executable, "-m", module, "experiment=smoke", f"data.cache_dir={cache}",
           f"hydra.run.dir={out / 'run'}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (out / "stdout.txt").write_text(proc.stdout)
    return out


def simulate(out: Path, cache: Path, *overrides: str) -> Path:
    """`unheard-simulate experiment=smoke` into ``out/run`` (stdout in ``out/stdout.txt``)."""
    return run_entry("experiments.simulate", out, cache, *overrides)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, sim_cache) -> Path:
    """The smoke simulation with DP, fixed sampling, outbound audit, membership inference and 2 canaries."""
    return simulate(tmp_path_factory.mktemp("smoke"), sim_cache, "federation.sampling=fixed",
                    "federation.audit_outbound=true", "audit.membership=true", "audit.canaries=2",
                    "audit.canary_references=7", "audit.max_utterances=20")


@pytest.fixture(scope="session")
def private_run(tmp_path_factory, sim_cache) -> Path:
    """privacy=both (central user-level noise), every training reply lost, a budget that stops the run;
    plain FedAvg at the server (lr 1), so each published round moves by the noised mean itself."""
    return simulate(
        tmp_path_factory.mktemp("both"), sim_cache, "privacy=both", "federation.rounds=3",
        "federation.server_optimizer=fedavg",
        "federation.drop_after_training=1.0", "privacy.sample.noise_multiplier=3.0",
        "privacy.user.noise_multiplier=2.0", "privacy.max_epsilon=2.5",
    ) / "run"


@pytest.fixture(scope="session")
def local_run(tmp_path_factory, sim_cache) -> Path:
    """privacy=both with local user-level noise, secure mode at both levels, the outbound audit, and
    the final model scored on 3 of the 4 devices' test splits."""
    return simulate(
        tmp_path_factory.mktemp("local"), sim_cache, "privacy=both", "privacy.user.noise=local",
        "privacy.sample.secure_mode=true", "privacy.user.secure_mode=true", "federation.sampling=fixed",
        "federation.audit_outbound=true", "federation.eval_devices=3",
    ) / "run"


@pytest.fixture
def task_identity():
    """Flower's task identity for a ServerApp run in-process (``run_server`` on a hand-made grid)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None
