#!/usr/bin/env bash
# The README's recipe table: six runs on the same data (Flowers102 train split, 10% held out, seed 0) with the
# same budget, then the three close ones again with a second seed. Each run ends by writing its settings and
# held-out numbers (PSNR, -ELBO, bits/dim, KL, active units, FID of 100 GMM samples) to TensorBoard's HPARAMS
# table, where the runs compare as rows:
#
#   bash recipes/compare.sh DATA_DIR [EPOCHS] [FLAGS...]      # FLAGS go to every run, e.g. --device cuda
#   tensorboard --logdir runs/recipes                          # then the HPARAMS tab
#
# FID needs requirements-metrics.txt; pass --fid-samples 0 to leave it out. ONLY="bernoulli cyclical-seed1"
# runs just the runs named. PYTHON names the interpreter (default: python on the PATH), e.g. PYTHON=.venv/bin/python
# outside an activated virtualenv.
set -euo pipefail
data_dir=${1:?usage: bash recipes/compare.sh DATA_DIR [EPOCHS] [FLAGS...]}
epochs=${2:-200}
shift $(($# < 2 ? $# : 2))
common=(--data-dir "$data_dir" --holdout 0.1 --epochs "$epochs" --log-dir runs/recipes --fid-samples 100)
only=" ${ONLY:-} "
run() {
  if [[ "$only" == "  " || "$only" == *" $1 "* ]]; then
    "${PYTHON:-python}" "$(dirname "$0")/../vae_training.py" "${common[@]}" --run-name "$@"
  fi
}
run seed-defaults "$@"
run batch-norm --batch-norm "$@"
run cyclical --kl-schedule cyclical "$@"
run gaussian-learned --likelihood gaussian-learned --beta 1 "$@"
run bernoulli --likelihood bernoulli --beta 1 "$@"
run resolution-64 --resolution 64 "$@"
for seed_one in "seed-defaults" "batch-norm --batch-norm" "cyclical --kl-schedule cyclical"; do
  read -r name flags <<< "$seed_one"
  # shellcheck disable=SC2086  # flags is a word list on purpose
  run "$name-seed1" --seed 1 $flags "$@"
done
