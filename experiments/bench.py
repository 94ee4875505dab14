"""`unheard-bench`: speed and memory figures, printed and written to bench.json.

* ``dp_step_ratio``: seconds per DP-SGD step (the production step, ``fl/privacy/sample.py``)
  over seconds per non-private AdamW step, the Conformer (``model=conformer``), a batch of 16
  utterances of 4 s. Also reported without dropout, whose random masks cost both steps alike.
* ``whisper_dp_step_ratio``: the same for Whisper tiny.en's preset recipe (decoder blocks on cached
  encoder outputs, 10 s window), a batch of 8 utterances of 16 tokens; every selection of
  :data:`WHISPER_RECIPES` is timed beside it (``whisper_<recipe>_*``).
* ``whisper_round_seconds``/``whisper_peak_gb``: one round of 8 devices x 8 DP-SGD steps of the
  Whisper preset on the embedded corpus (wall time at the server, its evaluation included) and the
  simulation's peak memory (features cached beforehand, so the round is what is timed).
  ``pseudo_device_overhead``: the same round on devices without transcripts (``train.labels=pseudo``,
  every drawn recording pseudo-labelled by the global model, threshold -inf so all train), its
  devices' summed seconds over the transcribed round's, minus 1 (issue target: at most 0.30).
* ``secret_overhead`` (``whisper_secret_overhead``): seconds of one device's training release
  (privacy=both, local noise: DP-SGD batches and noise plus the user-level share) with every draw
  from the secret ChaCha20 streams, over the same release (same batches) drawing its Gaussians
  from torch's MT19937 (the generator the streams replaced; measured for its cost only), on the
  Conformer (1.3M values a step) and on the Whisper preset.
* ``sim_overhead``: 1 - (device training seconds) / (actors x round wall time), for a round of
  16 devices of the Conformer with DP-SGD: the share of the round in which the simulation's
  actors did not train (messaging, model loading, aggregation, evaluation, checkpointing).
* ``rss_gb_10k``: peak memory (sum of the proportional set size, PSS, of the simulation's whole
  process tree: driver, Ray and its actors) of one round of a 10,000-device Conformer population
  with a cohort of 50.
* ``aggregate_round_seconds``: one round of DP-FedSGD (``experiment=private_gain``: 125 speechocean762
  devices, all asked, each drawing one Poisson batch at the public q and sending its clipped sum;
  the server noises the total once) on the Whisper preset: the mean of the steady rounds, neither
  scored (the preset scores only round 0 and the last) nor the first training round, in which every
  actor builds and wraps its model once (``aggregate_first_round_seconds``, reported beside it), over
  ``aggregate_bare_seconds``: the same expected number of
  example gradients (q x the pooled training recordings, about 64) through
  ``SampleLevel.clipped_sum`` as ONE device in this process (same clipping, same per-sample
  gradients: the unavoidable compute); ``aggregate_round_ratio`` is the first over the second,
  ``aggregate_device_seconds`` the seconds the cohort's devices spent on it, summed.
  ``aggregate_singles_seconds``: the same gradients as batches of one recording each (what the
  drawing devices mostly hold), in this process; ``aggregate_singles_ratio``, the round over that,
  is what the federation's machinery (messages, loading, state) costs beyond its small batches. Needs
  ``../shared/data/speechocean762`` (or ``UNHEARD_DATA``); without it the figure reports
  ``aggregate_round_skipped``. Features go to the default cache (``.cache``, or ``UNHEARD_CACHE``):
  featurising happens before the first round, so it is never in a timed round.
* ``demo_seconds``: wall time of ``make demo``'s job (``unheard-simulate``) with an empty cache:
  synthesising the corpus, featurising it with the Whisper seed's encoder, the federated run.
* ``featurise_utterances_per_second``: the frozen Whisper encoder's rate on chunks of 16 waveforms
  (``fl/data/features.py``'s chunk), as the feature cache is filled; on a GPU also under bf16
  autocast (``featurise_bf16_utterances_per_second``) where the GPU has bfloat16.

``--device`` (default ``cpu``) says where every figure is taken: the in-process steps build their
recognizers there (timed with ``torch.cuda.synchronize`` on a GPU) and every simulation runs with
that ``device``; on CUDA each simulated device's actor asks for ``--gpus-per-client`` of the GPU
(default 1 / the CPUs, so every actor the CPUs allow shares the one GPU), and the Whisper DP step
reports ``whisper_dp_step_cuda_peak_gb`` (the peak memory torch allocated for the preset's model
and its DP steps: one actor's share of the sizing rule, docs/scale.md, before the CUDA context).
The output's first fields (:meth:`Placement.info`) name the device (the GPU's name and memory on
CUDA). Nothing here has been run on a GPU yet. The in-process figures are in
:mod:`experiments.bench_steps`; the simulations, here, run the real entry point in a child
process; their outputs go to a temporary folder. ``--only`` picks figures (the 10k, demo and aggregate runs take minutes; e.g.
``.venv/bin/unheard-bench --only aggregate_round_seconds``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch

from clients.state import DeviceState
from experiments.bench_steps import STEPS, Placement, _time
from fl.config import ModelConfig, SamplePrivacyConfig, TrainConfig
from fl.model import build_recognizer
from fl.privacy.randomness import Secret
from fl.privacy.sample import ClippingModule, SampleAccount, SampleLevel
from server.results import read_private_rounds

ROOT = Path(__file__).resolve().parent.parent


def _tree_pss(root: int) -> dict[str, int]:
    """PSS in kB of ``root`` and each descendant, by ``name:pid`` (summed: shared pages counted once)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    out[f"{name}:{pid}"] = int(line.split()[1])
        except OSError:
            continue
    return out


def simulate(out: Path, where: Placement, *overrides: str, cache: Optional[Path] = None) -> tuple[float, float]:
    """Run ``unheard-simulate`` into ``out``, placed ``where`` (its ``device`` and GPU share);
    returns (wall seconds, peak PSS of its process tree in GB).

    The processes at the peak and their PSS are written to ``<out>.peak.json``.
    """
    env = dict(os.environ, FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    if cache is not None:
        env["UNHEARD_CACHE"] = str(cache)
    cmd = [sys.executable, "-m", "experiments.simulate", f"hydra.run.dir={out}", *where.overrides(), *overrides]
    log = open(out.parent / f"{out.name}.log", "w")
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    peak, at_peak = 0, {}

    def sample() -> None:
        nonlocal peak, at_peak
        while proc.poll() is None:
            now = _tree_pss(proc.pid)
            if sum(now.values()) > peak:
                peak, at_peak = sum(now.values()), now
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = proc.wait()
    seconds = time.perf_counter() - started
    sampler.join()
    log.close()
    (out.parent / f"{out.name}.peak.json").write_text(json.dumps(at_peak, indent=1))
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({code}); see {log.name}")
    return seconds, peak / 1024**2


def sim_overhead(work: Path, where: Placement, rounds: int = 3) -> dict[str, float]:
    """Rounds of 16 devices; the figures pool every round but the last (which adds the final
    federated evaluation, a once-per-run cost)."""
    out = work / "overhead"
    simulate(out, where, "model=conformer", "data.partition=iid", "data.num_devices=16", "federation.clients_per_round=16",
             "federation.sampling=fixed", f"federation.rounds={rounds}", "federation.device_eval_every=0")
    rows = read_private_rounds(out)[1:-1]  # round wall times: the experimenter's private figures under DP
    config = json.loads((out / "summary.json").read_text())["config"]["federation"]
    actors = max(1, int((os.cpu_count() or 1) // config["num_cpus_per_client"]))
    measured = {r["round"] for r in rows}
    # devices never send timings: each keeps its own in its state folder, which a simulation can read
    device = sum(entry["seconds"] for state in sorted((out / "fleet" / "state").iterdir())
                 for entry in DeviceState(state).rounds() if entry["round"] in measured)
    wall = sum(r["seconds"] for r in rows)
    return {"sim_round_seconds": wall / len(rows), "sim_device_seconds": device / len(rows), "sim_actors": actors,
            "sim_overhead": 1.0 - device / (actors * wall)}


def rss_10k(work: Path, where: Placement) -> dict[str, float]:
    """A population of 10,000 devices (two utterances each), a cohort of 50, one round."""
    seconds, peak = simulate(work / "pop10k", where, "model=conformer", "data.private_speakers=104",
                             "data.private_utterances=200", "data.eval_utterances=160", "data.partition=iid",
                             "data.num_devices=10000",
                             "federation.clients_per_round=50", "federation.sampling=fixed", "federation.rounds=1",
                             "federation.eval_devices=50")
    return {"rss_gb_10k": peak, "seconds_10k": seconds}


def demo(work: Path, where: Placement) -> dict[str, float]:
    """`make demo`'s job from an empty cache (the venv already installed)."""
    cache = work / "cold-cache"
    seconds, peak = simulate(work / "demo", where, cache=cache)
    return {"demo_seconds": seconds, "demo_peak_gb": peak}


def whisper_round(work: Path, where: Placement) -> dict[str, float]:
    """One round of 8 devices x 8 DP-SGD steps of the Whisper preset (features cached by a first run)."""
    args = ("data.private_speakers=12", "data.eval_speakers=4", "data.eval_utterances=80", "federation.rounds=1",
            "federation.sampling=fixed", "train.local_steps=8", "privacy=sample")
    cache = work / "whisper-cache"
    simulate(work / "whisper-warm", where, *args, "federation.clients_per_round=1", cache=cache)
    seconds, peak = simulate(work / "whisper-round", where, *args, "federation.clients_per_round=8", cache=cache)
    row = read_private_rounds(work / "whisper-round")[-1]
    # the same round on devices without transcripts, each pseudo-labelling what its batches draw
    simulate(work / "whisper-pseudo", where, *args, "federation.clients_per_round=8", "data.drop_transcripts=true",
             "train.labels=pseudo", "train.pseudo_threshold=-inf", cache=cache)
    pseudo = read_private_rounds(work / "whisper-pseudo")[-1]
    labelled, unlabelled = (_device_seconds(work / run, {1}) for run in ("whisper-round", "whisper-pseudo"))
    return {"whisper_round_seconds": row["seconds"], "whisper_round_devices": row["clients"],
            "whisper_run_seconds": seconds, "whisper_peak_gb": peak,
            "whisper_pseudo_round_seconds": pseudo["seconds"], "whisper_device_seconds": labelled,
            "whisper_pseudo_device_seconds": unlabelled, "pseudo_device_overhead": unlabelled / labelled - 1}


def _speechocean762() -> Path:
    """Where ``conf/data/speechocean762.yaml`` reads the corpus (``UNHEARD_DATA`` or ``../shared/data``)."""
    return Path(os.environ.get("UNHEARD_DATA", ROOT / ".." / "shared" / "data")) / "speechocean762"


def aggregate_round(work: Path, where: Placement, rounds: int = 6, extra: tuple[str, ...] = (),
                    cache: Optional[Path] = None, repeats: int = 3) -> Mapping[str, object]:
    """DP-FedSGD (``experiment=private_gain``): the wall seconds of a steady round (rounds 2 to
    ``rounds`` - 1: neither the actors' first nor the scored last), over
    the seconds of ``SampleLevel.clipped_sum`` on the same expected number of example gradients as
    one device in this process. ``extra`` overrides (a smaller dry run); ``cache``: the feature
    cache (default: the checkout's). The noise multiplier is fixed (0.7, about what the preset's
    epsilon 8 over its 60 rounds asks) rather than calibrated for these few rounds: it costs nothing."""
    corpus = _speechocean762()
    if not (corpus / "train").is_dir() or not (corpus / "dev").is_dir():
        return {"aggregate_round_skipped": f"no speechocean762 corpus at {corpus} (set UNHEARD_DATA)"}
    out = work / "aggregate-round"
    seconds, peak = simulate(out, where, "experiment=private_gain", f"federation.rounds={rounds}",
                             "privacy.sample.target_epsilon=null", "privacy.sample.noise_multiplier=0.7",
                             "audit.membership=false", "audit.canaries=0", *extra, cache=cache)
    return aggregate_figures(out, where, repeats) | {"aggregate_run_seconds": seconds, "aggregate_peak_gb": peak}


def _device_seconds(out: Path, rounds: set[int]) -> float:
    """The seconds the simulated devices of run ``out`` recorded for ``rounds`` (each keeps its own
    timings in its state folder: never sent, but a simulation can read them), summed."""
    return sum(entry["seconds"] for state in sorted((out / "fleet" / "state").iterdir())
               for entry in DeviceState(state).rounds() if entry["round"] in rounds)


def aggregate_figures(out: Path, where: Placement = Placement(), repeats: int = 3) -> dict[str, float]:
    """The figures of the finished DP-FedSGD run ``out``: its steady rounds against the bare compute.
    Round 1 is each actor's first message (it builds the recognizer and wraps it for Opacus once per
    process), paid once a run, not once a round: it is reported apart, not averaged in."""
    config = json.loads((out / "summary.json").read_text())["config"]
    final = int(config["federation"]["rounds"])
    private = read_private_rounds(out)
    rows = [r for r in private if 1 < r["round"] < final]  # neither the seed's, the actors' first nor the scored last
    if not rows:
        raise RuntimeError(f"{out}: no steady round to time (federation.rounds={final}; needs >= 3)")
    sim = sum(r["seconds"] for r in rows) / len(rows)
    first = next((r["seconds"] for r in private if r["round"] == 1), float("nan"))
    bare = aggregate_bare(out, where, repeats)
    return {"aggregate_round_seconds": sim, "aggregate_first_round_seconds": first, **bare,
            "aggregate_round_ratio": sim / bare["aggregate_bare_seconds"],
            "aggregate_singles_ratio": sim / bare["aggregate_singles_seconds"],
            "aggregate_device_seconds": _device_seconds(out, {r["round"] for r in rows}) / len(rows),
            "aggregate_round_devices": sum(r["clients"] for r in rows) / len(rows),
            "aggregate_cohort": int(config["federation"]["clients_per_round"]), "aggregate_rounds_timed": len(rows)}


def aggregate_bare(out: Path, where: Placement = Placement(), repeats: int = 3) -> dict[str, float]:
    """Seconds of ``SampleLevel.clipped_sum`` (the run ``out``'s mechanism and recognizer, its last
    model's shared weights, as a train message carries them: the model is built inside, once) on the
    example gradients one of its rounds draws in expectation -- q x the pooled training recordings
    of its fleet, drawn once -- as ONE device's one batch, in this process."""
    config = json.loads((out / "summary.json").read_text())["config"]
    final = int(config["federation"]["rounds"])
    recognizer = build_recognizer(ModelConfig(**config["model"]), config["train"]["trainable"], where.device)
    train = TrainConfig(**config["train"])
    pool = [e for path in sorted((out / "fleet").glob("device-*.pt"))
            for e in torch.load(path, weights_only=False)["train"]]
    level = SampleLevel.from_config(SamplePrivacyConfig(**config["privacy"]["sample"]), train, final,
                                    int(config["federation"]["clients_per_round"]))
    size = max(1, round(level.sample_rate * len(pool)))
    examples = random.Random(0).sample(pool, size)
    one_batch = replace(level, sample_rate=1.0)  # every one of them drawn, in each of its steps' batches
    secret = Secret.from_seed(0, "bench")
    torch.manual_seed(0)
    weights = torch.load(out / "checkpoints" / f"round-{final:03d}.pt", weights_only=False)["state_dict"]
    module = ClippingModule(recognizer)  # wrapped at the first call, reused as a device's actor reuses it
    seconds = _time(lambda: one_batch.clipped_sum(weights, module, examples, SampleAccount(), secret, 0),
                    1, repeats, where)
    # the same gradients as batches of one: what a round's drawing devices mostly hold (at q x ~15
    # recordings, about three quarters of the devices that draw anything draw exactly one)
    singles = _time(lambda: module.clipped_sums(weights, [[e] for e in examples], level.max_grad_norm,
                                                level.sum_cap / level.steps), 0, 1, where)
    return {"aggregate_bare_seconds": seconds, "aggregate_singles_seconds": singles, "aggregate_bare_examples": size,
            "aggregate_pooled_recordings": len(pool), "aggregate_sample_rate": level.sample_rate,
            "aggregate_steps": level.steps}


RUNS: dict[str, Callable[[Path, Placement], Mapping[str, object]]] = {
    "sim_overhead": sim_overhead, "rss_10k": rss_10k, "whisper_round": whisper_round,
    "aggregate_round_seconds": aggregate_round, "demo": demo}
"""The figures taken from simulations (into ``--work``)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench.json")
    parser.add_argument("--repeats", type=int, default=5)
    figure_names = [*STEPS, *RUNS]
    parser.add_argument("--only", nargs="+", choices=figure_names, default=figure_names)
    parser.add_argument("--work", help="folder for the simulations' outputs (default: a temporary one)")
    parser.add_argument("--device", default="cpu", help="where every figure is taken: cpu (default), auto, cuda, cuda:N")
    parser.add_argument("--gpus-per-client", type=float, default=None,
                        help="on CUDA, the GPU share of each simulated device's actor (default: 1 / the CPUs)")
    args = parser.parse_args()
    where = Placement(args.device, args.gpus_per_client)
    try:
        figures = where.info()
    except ValueError as err:  # a device this machine lacks: the config error, before anything runs
        parser.error(str(err))
    with tempfile.TemporaryDirectory(prefix="unheard-bench-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in args.only:
            figures |= STEPS[name](args.repeats, where) if name in STEPS else RUNS[name](work, where)
            Path(args.out).write_text(json.dumps(figures, indent=2))  # keep what is measured so far
    for k, v in figures.items():
        print(f"{k:>26}: {v:.4g}" if isinstance(v, float) else f"{k:>26}: {v}")


if __name__ == "__main__":
    main()
