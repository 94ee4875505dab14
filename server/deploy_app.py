"""The ServerApp that `flwr run` starts on a SuperLink (Flower's Deployment Engine).

Its settings come from the run config that ``unheard-launch`` wrote (``fl/runconfig.py``): the
whole Hydra-composed config plus the server-side paths of the seed weights, the evaluation set and
the output folder. The round loop is the simulation's (``server/server_app.py``), unchanged.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fl import runconfig
from server.server_app import ServerSettings, run_server

app = ServerApp()


def settings_from(run_config: dict) -> ServerSettings:
    cfg, resolved = runconfig.from_run_config(run_config)
    sample, fed = cfg.privacy.sample, cfg.federation
    return ServerSettings(
        out_dir=str(run_config[runconfig.OUT_DIR]), rounds=fed.rounds, clients_per_round=fed.clients_per_round,
        round_timeout=fed.round_timeout, seed=cfg.seed, model=cfg.model,
        initial_weights=str(run_config[runconfig.INITIAL_WEIGHTS]),
        eval_examples=str(run_config[runconfig.EVAL_EXAMPLES]), config=resolved, sampling=fed.sampling,
        sample_delta=sample.delta if sample else None, sample_accountant=sample.accountant if sample else None,
        user=cfg.privacy.user, max_epsilon=cfg.privacy.max_epsilon, device_eval_every=fed.device_eval_every,
        eval_devices=fed.eval_devices,
        resume=cfg.resume,
    )


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_server(grid, settings_from(dict(context.run_config)))
