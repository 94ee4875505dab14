#!/usr/bin/env bash
# The accuracy/privacy sweep behind `make curves` (PRESET=curves, Whisper, DP-FedSGD: REPEATS
# repeats of every point), `make curves-quick` (PRESET=curves_quick) and the Conformer's grid
# (PRESET=curves_conformer): Hydra multiruns into OUT, the centralised upper bound, then
# `unheard-collect OUT` (curves.csv, points.csv, curves.md, PNG plots).
#   usage: [REPEATS=3] [ARMS="central device finetune"] [CENTRAL_STEPS=480] experiments/curves.sh PRESET OUT
set -euo pipefail
preset=${1:?preset (curves or curves_quick)}
out=${2:?output folder}
bin=$(dirname "$0")/../.venv/bin
sim() { "$bin/unheard-simulate" -m "experiment=$preset" "hydra.sweep.dir=$out/$1" "${@:2}"; }
# the DP-FedSGD preset (conf/experiment/private_gain.yaml), whatever PRESET is
gain() { "$bin/unheard-simulate" -m experiment=private_gain "hydra.sweep.dir=$out/$1" "${@:2}"; }
# the centralised non-private fine-tune (the upper bound), once
central=("experiment=$preset" privacy=none)
# user-level DP stated for a deployment of 100,000 devices, 1,000 a round (accounting and noise
# scale; marked "extrapolated" in every report)
extrapolated=(privacy.user.population=100000 privacy.user.cohort=1000)
# user-level clipping norm: about the norm of an honest update (Whisper's preset moves 27K values
# by at most 4 x lr each: norm <= 2; the Conformer's updates are larger)
if [ "$preset" = curves ]; then user=(privacy.user.clipping_norm=2.0); else user=(privacy.user.clipping_norm=5.0); fi
started=$(date +%s)
if [ "$preset" = curves_quick ]; then
  sim none privacy=none
  sim sample privacy=sample privacy.sample.noise_multiplier=1.0
  sim user-central privacy=user "${user[@]}" "${extrapolated[@]}" privacy.user.noise_multiplier=1.0
elif [ "$preset" = curves ]; then
  # Whisper tiny.en on speechocean762, DP-FedSGD (experiment=private_gain: all 125 devices every
  # round, 60 rounds, the server adds the noise; sample-level, delta 1e-5, PLD). Each arm named in
  # ARMS (default "central device finetune") runs REPEATS (default 3) times with fresh secrets
  # (privacy.reproducible=false, the default), one sweep folder a repeat (OUT/<mechanism>/r<repeat>/<job>):
  #   central   DP-FedSGD at target epsilon 1, 2, 4, 8 (a Hydra multirun)                 4 runs
  #   device    on-device DP-SGD (privacy.sample.noise=device) at target epsilon 8          1 run
  #   none      non-private FL, the same preset                                              1 run
  #   finetune  once, not repeated: the central fine-tune of CENTRAL_STEPS (default 480) AdamW
  #             steps of train.batch_size 8 -- 3,840 recordings, what a DP-FedSGD run draws
  #             (60 rounds x an expected 64), not the default rounds x clients x local steps
  # The default keeps the sweep within 2 hours on 2 cores with the features cached (measured a run:
  # central 5.7 minutes, device 7.4, finetune 1.7; 12 + 3 + 1 runs, about 1.5 hours); "none" (not
  # timed at this preset) and on-device DP-SGD at epsilon 1, 2 and 4 are left out to fit.
  # cost: see experiments/README.md
  arms=" ${ARMS:-central device finetune} "
  for r in $(seq 1 "${REPEATS:-3}"); do
    if [[ $arms == *" central "* ]]; then gain "sample-central/r$r" privacy.sample.target_epsilon=1,2,4,8; fi
    if [[ $arms == *" device "* ]]; then gain "sample/r$r" privacy.sample.noise=device privacy.sample.target_epsilon=8; fi
    # the preset's privacy.sample block outlives privacy=none
    if [[ $arms == *" none "* ]]; then gain "none/r$r" privacy=none privacy.sample=null; fi
  done
  central=(experiment=private_gain privacy=none privacy.sample=null "central.steps=${CENTRAL_STEPS:-480}")
  [[ $arms == *" finetune "* ]] || central=()
else  # curves_conformer: the Conformer's full grid
  sim none privacy=none
  sim sample privacy=sample privacy.sample.noise_multiplier=0.6,1.2,2.5
  sim user-central-extrapolated privacy=user "${user[@]}" "${extrapolated[@]}" \
    privacy.user.noise_multiplier=0.3,1.0,3.0
  sim user-central privacy=user "${user[@]}" privacy.user.noise_multiplier=1.0
  sim user-local privacy=user "${user[@]}" privacy.user.noise=local privacy.user.noise_multiplier=1.0
  sim user-distributed privacy=user "${user[@]}" privacy.user.noise=distributed privacy.user.noise_multiplier=1.0
  sim both privacy=both "${user[@]}" "${extrapolated[@]}" privacy.sample.noise_multiplier=1.2 \
    privacy.user.noise_multiplier=1.0
fi
if [ ${#central[@]} -gt 0 ]; then "$bin/unheard-central" "${central[@]}" "hydra.run.dir=$out/central"; fi
echo "sweep took $(( $(date +%s) - started )) s" | tee "$out/sweep_seconds.txt"
"$bin/unheard-collect" "$out"
