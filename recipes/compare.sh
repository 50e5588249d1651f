#!/usr/bin/env bash
# The README's recipe table: six runs on the same data (Flowers102 train split, 10% held out, seed 0) with the
# same budget, each then evaluated on its held-out images. Usage: bash recipes/compare.sh DATA_DIR [EPOCHS]
set -euo pipefail
data_dir=${1:?usage: bash recipes/compare.sh DATA_DIR [EPOCHS]}
epochs=${2:-200}
common=(--data-dir "$data_dir" --holdout 0.1 --epochs "$epochs" --log-dir runs/recipes)
python vae_training.py "${common[@]}" --run-name seed-defaults
python vae_training.py "${common[@]}" --run-name batch-norm --batch-norm
python vae_training.py "${common[@]}" --run-name cyclical --kl-schedule cyclical
python vae_training.py "${common[@]}" --run-name gaussian-learned --likelihood gaussian-learned --beta 1
python vae_training.py "${common[@]}" --run-name bernoulli --likelihood bernoulli --beta 1
python vae_training.py "${common[@]}" --run-name resolution-64 --resolution 64
# The three close results again with a second seed (which also draws its own hold-out).
for recipe in "seed-defaults" "batch-norm --batch-norm" "cyclical --kl-schedule cyclical"; do
  set -- $recipe
  name=$1; shift
  python vae_training.py "${common[@]}" --run-name "$name-seed1" --seed 1 "$@"
done
