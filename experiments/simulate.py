"""`unheard-simulate`: one federated, private ASR simulation from a Hydra config.

data -> seed model (central pretraining on public speakers) -> Flower simulation (ServerApp in
``server/``, ClientApp in ``clients/`` on every simulated device) -> results in Hydra's run dir.
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import math
import sys
from pathlib import Path
from typing import Callable, Optional

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from clients.client_app import DeviceSettings, make_client_app
from clients.faults import Faults
from clients.simulated import SimulatedDevices, state_dir
from clients.state import DeviceState
from experiments import flower_speedups
from experiments.inputs import Inputs, build_inputs, run_audit
from fl.config import Config, FederationConfig, register_configs, validate
from fl.data.fleet import load_device, write_fleet
from fl.data.prepare import DataNotFound, check_paths
from fl.model import build_recognizer
from fl.train import evaluate, evaluation_devices
from server import checkpoint
from server.results import EXPERIMENTER_VIEW, SUMMARY, read_experimenter_view, write_experimenter_view
from server.server_app import ServerSettings, make_server_app

log = logging.getLogger(__name__)
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
register_configs()


def run(cfg: Config, out_dir: Path, resolved: dict) -> dict:
    """Run one simulation (and the leakage audit, if configured); returns the summary it wrote."""
    from flwr.simulation import run_simulation

    try:
        checkpoint.check_out_dir(out_dir, resolved, cfg.resume)
    except ValueError as err:
        log.error("%s", err)
        sys.exit(2)
    built = build_inputs(cfg, out_dir)
    fleet = out_dir / "fleet"
    ids = write_fleet(built.devices, fleet)
    torch.save(built.data.held_out, fleet / "held_out.pt")
    seed_path = str(built.seed.path)
    # every device's data is in its file now: the driver keeps the corpus only for the audit
    inputs: Optional[Inputs] = built if cfg.audit.membership or cfg.audit.canaries else None
    del built
    _return_freed_memory()

    fed = cfg.federation
    faults = Faults(fed.crash_before_training, fed.drop_after_training, fed.slow_devices, fed.slow_seconds)
    # the simulated devices train on the GPU share Ray gives their actors, and on the CPU without one;
    # an actor sees only the GPU Ray assigned it (CUDA_VISIBLE_DEVICES), as cuda:0, so "cuda", never cuda:N
    device = DeviceSettings(cfg.model, cfg.train, cfg.privacy.sample, cfg.privacy.user, cfg.seed,
                            fed.threads_per_client, faults, cfg.privacy.reproducible,
                            policy=cfg.privacy.device,  # the simulated devices' own policy (conf/config.yaml)
                            corrected_fraction=cfg.data.corrected_fraction,
                            device="cuda" if fed.gpus_per_client > 0 else "cpu")
    server = ServerSettings.from_config(cfg, resolved, str(out_dir), seed_path, str(fleet / "held_out.pt"))
    if fed.ray_address:
        log.info("attaching the simulation to the Ray cluster at %s", fed.ray_address)
    flower_speedups.apply()
    run_simulation(
        server_app=make_server_app(server),
        client_app=make_client_app(device, SimulatedDevices(str(fleet))),
        num_supernodes=len(ids),
        backend_config=backend_config(fed),
    )
    summary_path = out_dir / SUMMARY
    if not summary_path.exists():
        raise RuntimeError(f"the simulation ended without writing {summary_path}; see the log above")
    summary = json.loads(summary_path.read_text())
    trained = {device_id for pid, device_id in enumerate(ids)
               if DeviceState(state_dir(str(fleet), pid)).rounds_trained()}
    final = torch.load(out_dir / "checkpoints" / f"round-{summary['rounds']:03d}.pt", weights_only=False)
    if summary["federated_evaluation"] != "on":  # beside summary.json, never in it: no DP covers it
        seed_weights = torch.load(seed_path, weights_only=False)["state_dict"]
        write_experimenter_view(out_dir, {"simulation_eval": simulation_eval(
            cfg, str(fleet), len(ids), summary["rounds"], seed_weights, final["state_dict"])})
    summary["audit"] = run_audit(cfg, inputs, final["state_dict"], trained, out_dir) if inputs else None
    return summary


def backend_config(fed: FederationConfig) -> dict:
    """Flower's Ray backend settings: each device's resources, and the Ray instance that runs them.

    ``fed.ray_address`` attaches to that cluster (its own resources size the actor pool); otherwise a
    local instance starts, with ``fed.num_cpus`` CPUs when set (else all of this machine's). Each
    actor asks for ``fed.gpus_per_client`` of a GPU (0: none)."""
    # "local": a fresh Ray instance even where `ray start` left a cluster behind (Ray would join it)
    init_args: dict = {"include_dashboard": False, "address": fed.ray_address or "local"}
    if fed.ray_address is None and fed.num_cpus is not None:
        init_args["num_cpus"] = fed.num_cpus
    resources = {"num_cpus": fed.num_cpus_per_client, "num_gpus": fed.gpus_per_client}
    return {"client_resources": resources, "init_args": init_args}


def simulation_eval(cfg: Config, fleet: str, devices: int, rounds: int, seed: dict, final: dict) -> dict:
    """The seed and final models on the simulated devices' local test splits, pooled: the
    experimenter's view, which only a simulation has (no device sends test metrics under privacy),
    covered by no DP guarantee: written to ``experimenter_view.json``, not to ``summary.json``.

    The devices are those the server's federated evaluation of the last round would ask:
    all, or ``federation.eval_devices`` of them drawn by (seed, round)."""
    recognizer = build_recognizer(cfg.model, cfg.train.trainable, cfg.device)
    chosen = evaluation_devices(range(devices), cfg.federation.eval_devices, cfg.seed, rounds)
    every = [e for pid in chosen for e in load_device(fleet, pid).test]
    tests = [e for e in every if e.text is not None]
    if len(tests) < len(every):
        log.warning("experimenter view: %d of the devices' %d test recordings have no reference transcript and are "
                    "not scored", len(every) - len(tests), len(every))
    out: dict = {"observer": "experimenter (simulation only: read from the devices' files, never sent)",
                 "devices": len(chosen), "utterances": len(tests)}
    for label, weights in (("seed_model", seed), ("final", final)):
        result = evaluate(recognizer, recognizer.module_from(weights), tests) if tests else None
        out[label] = {"device_wer": result.wer if result else None, "device_cer": result.cer if result else None,
                      "device_raw_wer": result.raw_wer if result else None,
                      "device_loops_cut": result.loops_cut if result else None}
    return out


def _return_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise: a corpus is many small tensors)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to do


def print_audit(console: Console, audit: dict | None) -> None:
    """One line per leakage audit that ran (see ``fl/audit``)."""
    if not audit:
        return
    mia = audit.get("membership")
    if mia and mia.get("members"):
        parts = [f"{label}: AUC {r['auc']:.3f}, TPR@1%FPR {r['tpr_at_1pct_fpr']:.3f}"
                 for label, r in (("same speakers", mia["same_speakers"]), ("other speakers", mia["other_speakers"]))
                 if r]
        console.print(f"membership inference ({mia['members']} member utterances): " + "; ".join(parts))
    can = audit.get("canaries")
    if can:
        mean = "-" if can["mean_exposure"] is None else f"{can['mean_exposure']:.2f}"
        console.print(f"canaries: {can['trained']}/{can['planted']} on devices that trained, mean exposure {mean} "
                      f"bits of {math.log2(can['references'] + 1):.2f} (chance ~1.44)")


def print_summary(summary: dict, out_dir: Path) -> None:
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    table = Table(title=f"unheard: {summary['config']['name']} ({summary['rounds']} rounds)")
    table.add_column("model", no_wrap=True)
    for col in ("held-out WER (raw)", "CER", "loops", "device WER", "device CER"):
        table.add_column(col)
    final_label = f"final (privacy={summary['config']['privacy']['name']})"
    model = summary["config"]["model"]
    seed_label = f"seed ({model['path'] or 'Whisper tiny.en'})" if model["kind"] == "whisper" else "seed (public only)"
    sim = (read_experimenter_view(out_dir) or {}).get("simulation_eval")
    for label, key in ((seed_label, "seed_model"), (final_label, "final")):
        s = summary[key]
        dev = sim[key] if sim else s
        table.add_row(label, f"{pct(s['wer'])} ({pct(s.get('raw_wer'))})", pct(s["cer"]),
                      str(s.get("loops_cut", "-")), pct(dev["device_wer"]), pct(dev["device_cer"]))
    console = Console()
    console.print(table)
    console.print("WER and CER after Whisper's English normaliser (numbers, case, punctuation); raw WER without it; "
                  "loops: runaway decodings cut")
    if sim:
        console.print(f"device WER/CER: {sim['observer']}; federated evaluation {summary['federated_evaluation']}")
    privacy = summary["privacy"]
    if privacy.get("randomness", "secret") != "secret":
        console.print(f"[bold red]{privacy['randomness'].upper()}[/bold red]")
    sample = privacy["sample"]
    if sample:
        console.print(
            f"sample-level DP: epsilon = {sample['epsilon']:.2f} at delta = {sample['delta']:g} against "
            f"{sample['observer'].split(';')[0]} (a device in every round: {sample['max_rounds']} rounds, {sample['max_steps']} "
            f"steps, q = {sample['sample_rate']:.3f}, sigma = {sample['noise_multiplier']:.3g}, "
            f"C = {sample['max_grad_norm']}, {sample['accountant']})"
        )
    else:
        console.print("sample-level DP: off (no formal guarantee for utterances)")
    user = privacy["user"]
    if user:
        console.print(
            f"user-level DP: epsilon = {user['epsilon']:.2f} at delta = {user['delta']:.2g} against "
            f"{user['epsilon_observer']}, over {user['rounds']} rounds "
            f"(z = {user['noise_multiplier']:.3g}, {user['noise']} noise, C = {user['clipping_norm']:.3g} "
            f"{user['clipping']}, q = {user['sampling_rate']:.3f} {user['sampling']} sampling"
            f"{', amplification NOT claimed' if not user['amplification'] else ''}"
            f"{', EXTRAPOLATED to a population of ' + str(user['population']) if user['extrapolated'] else ''}, "
            f"{user['accountant']})"
        )
        if user["epsilon_server"] is not None:
            console.print(f"user-level DP: epsilon = {user['epsilon_server']:.2f} against "
                          f"{user['epsilon_server_observer']} (a device in every round: {user['server_rounds']} rounds, "
                          "no amplification, replace-one sensitivity 2C)")
    else:
        console.print("user-level DP: off (no formal guarantee for devices)")
    print_audit(console, summary.get("audit"))
    if summary.get("stopped_early"):
        console.print(f"stopped early by the privacy budget: {summary['stopped_early']}")
    console.print(f"results: {out_dir}/results.jsonl, {out_dir}/summary.json"
                  + (f"; experimenter view (not covered by DP): {out_dir}/{EXPERIMENTER_VIEW}" if sim else ""))


def run_checked(dcfg: DictConfig, runner: Callable[[Config, Path, dict], dict],
                report: Callable[[dict, Path], None] | None = None) -> None:
    """Validate the composed config (and that its corpora exist), run, print the summary (or what
    ``report`` prints of the runner's result)."""
    cfg: Config = OmegaConf.to_object(dcfg)  # type: ignore[assignment]
    try:
        validate(cfg)
        check_paths(cfg.data)
    except (ValueError, DataNotFound) as err:
        log.error("invalid config: %s", err)
        sys.exit(2)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    summary = runner(cfg, out_dir, OmegaConf.to_container(dcfg, resolve=True))  # type: ignore[arg-type]
    (report or print_summary)(summary, out_dir)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(dcfg: DictConfig) -> None:
    run_checked(dcfg, run)


if __name__ == "__main__":
    main()
