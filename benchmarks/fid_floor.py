"""The floor of FID and KID for a run's held-out images: real training images scored exactly as generated ones.

    python benchmarks/fid_floor.py --checkpoint pretrained/flowers32.pt --data-dir DATA_DIR

A model's samples cannot be expected to score better than other photos of the same flowers. This compares
--num images drawn at random from the images the run trained on with the run's held-out images, through the
same Inception pipeline as `vae_inference.py evaluate --fid-samples`. The last line printed is one JSON object.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datasets.batches import random_subset, to_float  # noqa: E402
from datasets.preprocessing import dataset_images  # noqa: E402
from vae.fid import fid_kid, inception_features, load_inception  # noqa: E402
from vae.trained import load_model  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint of a run trained with --holdout")
    parser.add_argument("--data-dir", required=True, help="the Flowers102 root the run trained on")
    parser.add_argument("--num", type=int, default=102, help="training images drawn at random")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    config = load_model(args.checkpoint, "cpu").config
    kwargs = dict(holdout=config.holdout, holdout_seed=config.seed, resize=config.resize)
    held_out, _ = dataset_images(args.data_dir, config.split, config.resolution, subset="held-out", **kwargs)
    training, _ = dataset_images(args.data_dir, config.split, config.resolution, subset="train", **kwargs)
    training = training[random_subset(len(training), args.num, args.seed)]
    extractor = load_inception("cpu")
    results = fid_kid(inception_features(to_float(held_out), extractor),
                      inception_features(to_float(training), extractor))
    results.update(reference_images=len(held_out), training_images=len(training), torch=str(torch.__version__))
    print(f"training images against held-out images: FID {results['fid']:.1f}, KID {results['kid']:.4f} "
          f"+- {results['kid_stderr']:.4f} ({len(training)} against {len(held_out)})")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
