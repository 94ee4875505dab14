"""The ServerApp that `flwr run` starts on a SuperLink (Flower's Deployment Engine).

Its settings come from the run config that ``unheard-launch`` wrote (``fl/runconfig.py``): the
whole Hydra-composed config plus the server-side paths of the seed weights, the evaluation set and
the output folder. The round loop is the simulation's (``server/server_app.py``), unchanged.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fl import runconfig
from fl.deploy.flower import console_logging
from server.server_app import ServerSettings, run_server

console_logging()  # after the imports: Opacus has configured the root logger by now
app = ServerApp()


def settings_from(run_config: dict) -> ServerSettings:
    cfg, resolved = runconfig.from_run_config(run_config)
    return ServerSettings.from_config(cfg, resolved, str(run_config[runconfig.OUT_DIR]),
                                      str(run_config[runconfig.INITIAL_WEIGHTS]),
                                      str(run_config[runconfig.EVAL_EXAMPLES]))


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_server(grid, settings_from(dict(context.run_config)))
