"""Deployment on loopback: SuperLink with TLS and SuperNode authentication, 3 devices, 2 runs.

Every process is started by PID on free ports and stopped at the end. What is checked: the run
finishes with results and epsilon, devices keep their ledger in their state folder, a restarted
device continues its accounting, replies over the real transport carry only model-shaped arrays
and allowed scalars (as the ServerApp received them), neither an unregistered key nor a wrong CA
gets in, and a stopped run resumes exactly once, never beside a ServerApp still on its folder.
"""

import fcntl
import json
import signal
import ssl
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from clients.state import DeviceState
from experiments.loopback import BIN, ROOT, Loopback, flower_free_env
from fl.data.embedded import build_embedded_corpus
from fl.deploy.certs import make_ca_and_server, make_device_key
from fl.deploy.flower import write_connection
from server.inbound import read_inventory
from server.results import read_private_rounds

pytestmark = pytest.mark.timeout(900)


def write_device_data(root: Path, cache: Path) -> None:
    """Three devices, each a folder of recordings with transcripts (the smoke preset's private speakers)."""
    corpus = build_embedded_corpus(cache / "embedded", n_public=4, n_private=6, public_utterances=20,
                                   private_utterances=8, seed=0, shift=0.5)
    speakers = sorted({u.speaker for u in corpus.private})[:3]
    for i, speaker in enumerate(speakers):
        folder = root / "data" / f"device{i}"
        folder.mkdir(parents=True)
        for u in (u for u in corpus.private if u.speaker == speaker):
            (folder / f"{u.id}.wav").symlink_to(u.audio)
            (folder / f"{u.id}.txt").write_text(u.text)


def smoke(cache: Path, rounds: int) -> list[str]:
    """The smoke preset on the 3 devices, every device every round; the ServerApp takes the inventory
    of every reply it receives (``server/inbound.py``)."""
    return ["experiment=smoke", f"data.cache_dir={cache}", "deploy.timeout=600", f"federation.rounds={rounds}",
            "federation.clients_per_round=3", "federation.sampling=fixed", "federation.round_timeout=300",
            "federation.audit_outbound=true"]


def launch(fleet: Loopback, ca: Path, cache: Path, name: str, rounds: int, *extra: str) -> Path:
    """``unheard-launch`` of :func:`smoke` to the end."""
    out = fleet.root / name
    proc = fleet.launch(ca, out, *smoke(cache, rounds), *extra)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


def device(fleet: Loopback, name: str, key: Path, ca: Path):
    # the operator opts into a larger sample-level budget than the default 10: device0 trains in all 5
    # rounds of the three runs (10 steps at z 0.8, epsilon 10.02); --audit-dir: the owner's own log
    return fleet.device(name, key, ca, "--audit-dir", str(fleet.root / "outbound" / name), "--max-epsilon", "30")


def ledger_steps(fleet: Loopback, name: str) -> int:
    history = json.loads((fleet.root / "state" / name / "ledger.json").read_text())["history"]
    return sum(steps for _, _, steps in history)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, sim_cache):
    root = tmp_path_factory.mktemp("deploy")
    certs, keys = root / "certs", root / "keys"
    make_ca_and_server(certs)
    for i in range(3):
        make_device_key(keys / "allowed", f"device{i}")
    make_device_key(keys, "intruder")
    make_ca_and_server(root / "other-ca")
    write_device_data(root, sim_cache)
    for stranger in ("intruder", "wrong-ca"):
        (root / "data" / stranger).mkdir()
    fleet = Loopback(root)
    fleet.superlink(certs, keys / "allowed")
    assert "3 of 3 device keys allowed" in fleet.log("superlink")
    for i in range(3):
        device(fleet, f"device{i}", keys / "allowed" / f"device{i}", certs / "ca.crt")
    for i in range(3):
        fleet.wait_for(f"device{i}", "SuperNode ID")
    first = launch(fleet, certs / "ca.crt", sim_cache, "run1", rounds=2)
    steps_after_first = ledger_steps(fleet, "device0")
    fleet.stop("device0")  # a device restarts between runs
    device(fleet, "device0", keys / "allowed" / "device0", certs / "ca.crt")
    fleet.wait_for("device0", "SuperNode ID")
    second = launch(fleet, certs / "ca.crt", sim_cache, "run2", rounds=1)
    yield {"fleet": fleet, "first": first, "second": second, "steps_after_first": steps_after_first,
           "keys": keys, "certs": certs, "cache": sim_cache}
    fleet.stop_all()


def test_a_run_over_tls_finishes_with_results_and_epsilon(deployment):
    rows = [json.loads(x) for x in (deployment["first"] / "results.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    realised = read_private_rounds(deployment["first"])  # the server's private folder: counts are not published
    assert realised[2]["clients"] == 3 and realised[2]["failures"] == 0 and "clients" not in rows[2]
    assert 0 < rows[1]["epsilon_sample"] < rows[2]["epsilon_sample"]
    summary = json.loads((deployment["first"] / "summary.json").read_text())
    assert summary["privacy"]["sample"]["epsilon"] == rows[2]["epsilon_sample"]
    assert summary["config"]["name"] == "smoke"


def test_each_device_keeps_its_accountant_in_its_state_folder(deployment):
    fleet = deployment["fleet"]
    for i in range(3):
        assert (fleet.root / "state" / f"device{i}" / "ledger.json").exists()
        assert (fleet.root / "state" / f"device{i}" / "rounds.jsonl").exists()
    assert deployment["steps_after_first"] == 2 * 2  # 2 rounds x 2 local steps


def test_a_restarted_device_continues_its_accounting(deployment):
    fleet = deployment["fleet"]
    assert ledger_steps(fleet, "device0") == deployment["steps_after_first"] + 2  # + 1 round x 2 local steps
    first = json.loads((deployment["first"] / "summary.json").read_text())["privacy"]["sample"]["epsilon"]
    second = json.loads((deployment["second"] / "summary.json").read_text())["privacy"]["sample"]["epsilon"]
    assert second < first  # the server reports this run's spend (1 round, then 2 before) ...
    own = DeviceState(fleet.root / "state" / "device0").account("pld").epsilon(1e-5)  # the run's accountant
    assert own > first  # ... the device's own ledger composes both runs


def test_replies_over_the_real_transport_carry_only_model_arrays_and_allowed_scalars(deployment):
    """What the ServerApp received over TLS, at receipt and before any check (its inventory), not the
    devices' word for it; the devices' own logs (``--audit-dir``) list the same replies."""
    from collections import Counter

    from clients.guard import allowed_metrics
    from fl.config import ModelConfig
    from fl.model.conformer import ConformerCTC

    cfg = json.loads((deployment["first"] / "summary.json").read_text())["config"]["model"]
    shapes = {k: list(v.shape) for k, v in ConformerCTC(ModelConfig(**cfg), 29).state_dict().items()}
    first, second = read_inventory(deployment["first"]), read_inventory(deployment["second"])
    rows = first + second
    assert [sum(r["type"] == "train" for r in run) for run in (first, second)] == [2 * 3, 1 * 3]  # 3 devices
    assert [sum(r["type"] == "query" for r in run) for run in (first, second)] == [3, 3]
    assert {r["type"] for r in rows} == {"query", "train"}  # no federated evaluation under privacy
    for r in rows:
        assert r["error"] is None and r["configs"] == {} and r["lengths"] == {}
        assert r["records"] == (["arrays", "metrics"] if r["type"] == "train" else ["metrics"])
        assert r["arrays"] == ({"arrays": shapes} if r["type"] == "train" else {})
        assert set(r["metrics"]["metrics"]) <= allowed_metrics(sample=True, user=False)
        assert set(r["metrics"]["metrics"].values()) <= {"int", "float"}
    outbound = deployment["fleet"].root / "outbound"
    logged = [json.loads(line) for f in outbound.rglob("*.jsonl") for line in f.read_text().splitlines()]
    received = [{"type": r["type"], "records": r["records"], "arrays": r["arrays"].get("arrays"),
                 "metrics": r["metrics"].get("metrics")} for r in rows]  # in the device log's form
    assert Counter(json.dumps(r, sort_keys=True) for r in logged) == Counter(json.dumps(r, sort_keys=True)
                                                                            for r in received)


def test_an_unregistered_device_is_refused(deployment):
    fleet = deployment["fleet"]
    proc = device(fleet, "intruder", deployment["keys"] / "intruder", deployment["certs"] / "ca.crt")
    assert proc.wait(timeout=120) != 0
    assert "Failed to activate SuperNode" in fleet.log("intruder")
    fleet.procs.pop("intruder")


def test_a_device_without_the_right_root_certificate_cannot_connect(deployment):
    fleet = deployment["fleet"]
    proc = device(fleet, "wrong-ca", deployment["keys"] / "allowed" / "device1", fleet.root / "other-ca" / "ca.crt")
    assert proc.wait(timeout=120) != 0
    assert "CERTIFICATE_VERIFY_FAILED" in fleet.log("wrong-ca")
    fleet.procs.pop("wrong-ca")


def test_an_outsider_with_the_public_ca_and_a_key_of_their_own_reaches_only_the_fleet_api(deployment, tmp_path):
    """The outsider holds ``ca.crt`` (public, on every device) and a key pair of their own, and dials the
    address devices use. Every operator action is refused there; only Fleet calls pass, and those
    still need an allowed key."""
    fleet, ca = deployment["fleet"], deployment["certs"] / "ca.crt"
    home = tmp_path / "outsider-home"
    write_connection(home, fleet.address, ca)
    env = dict(flower_free_env(), FLWR_HOME=str(home))
    attempts = {
        "register a node": ["supernode", "register", str(deployment["keys"] / "intruder.pub"), "unheard"],
        "list nodes": ["supernode", "ls", "unheard"],
        "list runs": ["ls", "unheard"],
        "read a log": ["log", "1", "unheard", "--show"],
        "stop a run": ["stop", "1", "unheard"],
        "submit a run": ["run", str(ROOT), "unheard"],
    }
    transcript = {}
    for action, args in attempts.items():
        proc = subprocess.run([str(BIN / "flwr"), *args], env=env, capture_output=True, text=True, timeout=120,
                              cwd=tmp_path)
        said = [line.strip(" │") for line in (proc.stdout + proc.stderr).splitlines() if "Fleet API" in line]
        transcript[action] = {"exit": proc.returncode, "said": said[:1]}
        assert proc.returncode != 0, action
        assert "Only the Fleet API is served on this address" in proc.stdout + proc.stderr, (action, proc.stdout)
    (fleet.root / "outsider-transcript.json").write_text(json.dumps(transcript, indent=1))
    context = ssl.create_default_context(cafile=str(ca))
    with httpx.Client(base_url=f"https://{fleet.address}", verify=context, timeout=30) as client:
        for method, path in (("POST", "/v1/runtime/acquire-task"), ("POST", "/v1/control/list-runs"),
                             ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/health"),
                             ("POST", "/v1/fleet/%2e%2e/control/list-runs"), ("GET", "/v1/fleet/get-run"),
                             ("POST", "/v1/fleet/get-run?x=1")):
            assert client.request(method, path).status_code == 403, path
        # a Fleet call passes the proxy and meets the SuperLink's own node authentication
        assert client.post("/v1/fleet/get-run", content=b"").status_code not in (403, 404, 502)
    # the operator's loopback address still works: the deployment's runs were launched through it
    assert (deployment["first"] / "summary.json").exists()


def test_a_stopped_launcher_stops_its_run_and_resume_accounts_every_release_once(deployment):
    """Kill the launcher mid-run (SIGTERM), then resume: rounds in order, every release counted once.

    (Another run is never the same request, even from the same seed model: the server's run nonce
    names the run -- see clients/state.py. The resumed run keeps its nonce, so a round asked again is.)"""
    fleet, ca, cache = deployment["fleet"], deployment["certs"] / "ca.crt", deployment["cache"]
    out = fleet.root / "run3"
    before = {i: ledger_steps(fleet, f"device{i}") for i in range(3)}
    cmd = fleet.launch_command(ca, out, *smoke(cache, 2), "seed=1")
    with open(fleet.root / "launch3.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=flower_free_env(), stdout=log, stderr=subprocess.STDOUT)
    results = out / "results.jsonl"
    deadline = time.monotonic() + 600
    while not (results.exists() and len(results.read_text().splitlines()) >= 2):  # round 1 published
        assert proc.poll() is None and time.monotonic() < deadline, (fleet.root / "launch3.log").read_text()[-3000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 130
    said = (fleet.root / "launch3.log").read_text()
    assert "stopped run" in said and "resume=true" in said
    # the SuperLink may call the stopped run finished while its ServerApp still winds down, so the
    # launcher's own check (a run still running there) can let a resume through: the ServerApp's lock
    # on the folder must then refuse the second one. Hold that lock as a winding-down ServerApp does.
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    deadline = time.monotonic() + 120
    while "finished" not in subprocess.run([str(BIN / "flwr"), "ls", "unheard", "--run-id", run_id, "--format",
                                            "json"], env=dict(flower_free_env(), FLWR_HOME=str(out / "flwr-home")),
                                           capture_output=True, text=True).stdout:
        assert time.monotonic() < deadline
        time.sleep(1)
    published, spent = results.read_text(), {i: ledger_steps(fleet, f"device{i}") for i in range(3)}
    with open(out / "private" / "server.lock", "a") as lock:
        while True:  # taken once the stopped ServerApp has let go of it; held from here on
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.monotonic() < deadline, "the stopped ServerApp never released the run folder"
                time.sleep(0.5)
        refused = fleet.launch(ca, out, *smoke(cache, 2), "seed=1", "resume=true")
        refusal = refused.stdout + refused.stderr
        assert refused.returncode == 1, refusal[-3000:]
        assert "another ServerApp is running on" in refusal, refusal[-3000:]
        assert results.read_text() == published  # nothing of the refused attempt reached the folder ...
        assert {i: ledger_steps(fleet, f"device{i}") for i in range(3)} == spent  # ... or the devices
    resumed = fleet.launch(ca, out, *smoke(cache, 2), "seed=1", "resume=true")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    rows = [json.loads(x)["round"] for x in results.read_text().splitlines()]
    assert rows == [0, 1, 2]
    for i in range(3):
        trained = [r for r in DeviceState(fleet.root / "state" / f"device{i}").rounds()]
        run3 = trained[-2:]
        assert [r["round"] for r in run3] == [1, 2]  # each round of this run trained, and recorded, once
        assert ledger_steps(fleet, f"device{i}") == before[i] + 2 * 2  # and spent once: 2 rounds x 2 steps
