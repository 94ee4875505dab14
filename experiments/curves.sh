#!/usr/bin/env bash
# The accuracy/privacy sweep behind `make curves` (PRESET=curves, Whisper), `make curves-quick`
# (PRESET=curves_quick) and the Conformer's grid (PRESET=curves_conformer): one Hydra multirun per
# mechanism into OUT, the centralised upper bound, then `unheard-collect OUT` (curves.csv,
# curves.md, PNG plots).
#   usage: experiments/curves.sh PRESET OUT
set -euo pipefail
preset=${1:?preset (curves or curves_quick)}
out=${2:?output folder}
bin=$(dirname "$0")/../.venv/bin
sim() { "$bin/unheard-simulate" -m "experiment=$preset" "hydra.sweep.dir=$out/$1" "${@:2}"; }
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
elif [ "$preset" = curves ]; then  # Whisper: one point per mechanism, to stay within the hour
  sim none privacy=none
  sim sample privacy=sample privacy.sample.noise_multiplier=1.2
  sim user-central-extrapolated privacy=user "${user[@]}" "${extrapolated[@]}" privacy.user.noise_multiplier=1.0
  sim user-central privacy=user "${user[@]}" privacy.user.noise_multiplier=1.0
  sim user-local privacy=user "${user[@]}" privacy.user.noise=local privacy.user.noise_multiplier=1.0
  sim user-distributed privacy=user "${user[@]}" privacy.user.noise=distributed privacy.user.noise_multiplier=1.0
  sim both privacy=both "${user[@]}" "${extrapolated[@]}" privacy.sample.noise_multiplier=1.2 \
    privacy.user.noise_multiplier=1.0
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
"$bin/unheard-central" "experiment=$preset" privacy=none "hydra.run.dir=$out/central"
echo "sweep took $(( $(date +%s) - started )) s" | tee "$out/sweep_seconds.txt"
"$bin/unheard-collect" "$out"
