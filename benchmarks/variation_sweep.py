"""How far should variations go? A sweep of --strength for each variation mode, measured on the photos a
checkpoint's run held out (its --holdout), with the numbers of `vae_inference.py evaluate --variations`:
species kept against diversity, one curve per mode, and a grid of photos with variations at three strengths.

    python benchmarks/variation_sweep.py --data-dir DATA_DIR --plot sweep.png --grid grid.png

The Inception features of the photos and the training images, and the species classifier, are computed once
for the whole sweep. Needs requirements-metrics.txt (Inception, the plot). Prints a JSON line per point, and
the whole sweep as one JSON line last.
"""

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datasets.batches import random_subset, to_float  # noqa: E402
from datasets.folders import flower_classes  # noqa: E402
from datasets.preprocessing import dataset_images  # noqa: E402
from vae import evaluation, inference  # noqa: E402
from vae.device import pick_device  # noqa: E402
from vae.errors import UserError  # noqa: E402
from vae.trained import load_model  # noqa: E402
from vae_inference import PRETRAINED  # noqa: E402

def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", default=str(PRETRAINED), help="a checkpoint trained with --holdout")
    parser.add_argument("--data-dir", required=True, help="the Flowers102 root the checkpoint was trained on")
    parser.add_argument("--modes", nargs="+", default=["kind", "diffusion"],
                        choices=list(inference.variation_modes()), help="variation modes to sweep")
    parser.add_argument("--strengths", nargs="+", type=float, default=[0.1, 0.2, 0.3, 0.35, 0.4, 0.5, 0.7],
                        help="strengths of the kind, diffusion and gmm modes")
    parser.add_argument("--baseline-strengths", nargs="+", type=float, default=None,
                        help="strengths of the modes after the first, the ones it is compared with (default: "
                             "--strengths)")
    parser.add_argument("--posterior-strengths", nargs="+", type=float, default=[0.5, 0.75, 0.857],
                        help="strengths of the posterior mode (T = 1, 3 and 6)")
    parser.add_argument("--variations", type=int, default=8, help="variations of each photo")
    parser.add_argument("--seed", type=int, default=0, help="seed of the variations")
    parser.add_argument("--device", default="auto", help="where the model and Inception run")
    parser.add_argument("--plot", default="", help="PNG of species kept against diversity")
    parser.add_argument("--grid", default="", help="PNG: photos, each followed by variations at three strengths")
    parser.add_argument("--grid-strengths", nargs=3, type=float, default=[0.1, inference.DEFAULT_STRENGTH, 0.35],
                        help="the grid's three strengths (of the first mode)")
    parser.add_argument("--kind-code-noise", type=float, default=None,
                        help="noise drawn around the photo's code by the kind mode (default: its fit's)")
    parser.add_argument("--kind-candidates", type=int, default=1,
                        help="the kind mode draws this many variations of a photo and keeps the one whose code is "
                             "nearest the photo's")
    parser.add_argument("--kind-guidance", type=float, default=None,
                        help="classifier-free guidance of the kind mode (default: its fit's)")
    parser.add_argument("--grid-photos", type=int, default=6, help="photos in the grid (a seeded draw)")
    parser.add_argument("--class-samples", type=int, default=0,
                        help="also draw this many samples of each training class from the kind sampler "
                             "(sample --class N) and give the share the species classifier puts in their class")
    return parser


def plot_sweep(points, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    first = points[0]
    ceiling, reconstructions = first["species_accuracy_real"], first["species_kept_reconstructions"]
    axes.axhline(ceiling, color="grey", linestyle="--", linewidth=1)
    # At the axes' right edge whatever the sweep's range: a label placed in data units beyond it widens the figure.
    axes.text(0.99, ceiling, "real photos", transform=axes.get_yaxis_transform(), ha="right", va="bottom",
              color="grey", fontsize=8)
    axes.axhline(0.5 * ceiling, color="grey", linestyle=":", linewidth=1)
    axes.axvline(0.5, color="grey", linestyle=":", linewidth=1)
    axes.text(0.51, 0.5 * ceiling, "target: 50% of real,\ndiversity 0.5", va="bottom", color="grey", fontsize=7)
    axes.plot([0], [reconstructions], "k*", markersize=9, label="reconstructions")
    for mode in dict.fromkeys(point["variation_mode"] for point in points):
        curve = [point for point in points if point["variation_mode"] == mode]
        axes.plot([p["variation_diversity"] for p in curve], [p["species_kept"] for p in curve], "o-", label=mode)
        for p in curve:
            axes.annotate(f"{p['variation_strength']:g}", (p["variation_diversity"], p["species_kept"]),
                          textcoords="offset points", xytext=(4, 3), fontsize=7)
    axes.set_xlabel("diversity (pooled RMSE between variations / between photos of one species)")
    axes.set_ylabel("species kept (share of variations)")
    axes.set_xlim(left=-0.03)
    axes.set_ylim(bottom=0)
    axes.legend(fontsize=8, loc="upper center")
    axes.set_title(f"{first['variations']} variations of each of {first['variation_fid_reference_images']} "
                   f"held-out photos; labels: strength", fontsize=9)
    figure.tight_layout()
    figure.savefig(path)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.kind_candidates < 1 or (args.kind_code_noise or 0) < 0 or (args.kind_guidance or 0) < 0:
            raise UserError(f"--kind-candidates {args.kind_candidates}, --kind-code-noise {args.kind_code_noise}, "
                            f"--kind-guidance {args.kind_guidance}: give 1 or more candidates, a code noise of 0 or "
                            f"more and a guidance of 0 or more")
        if args.class_samples < 0:
            raise UserError(f"--class-samples {args.class_samples}: give 0 (none) or more samples per class")
        knobs = args.kind_candidates != 1 or args.kind_code_noise is not None or args.kind_guidance is not None
        if knobs and "kind" not in args.modes:
            raise UserError(f"--kind-code-noise, --kind-candidates and --kind-guidance change the kind mode only, "
                            f"and --modes {' '.join(args.modes)} does not sweep it; add kind to --modes")
        device = pick_device(args.device)
        trained = load_model(args.checkpoint, device)
        model, config = trained.model, trained.config
        if "kind" in trained.samplers:  # the knobs of the kind mode, for every variation it makes here
            kind = trained.samplers["kind"]
            kind.vary = functools.partial(kind.vary, code_noise=args.kind_code_noise, candidates=args.kind_candidates)
            if args.kind_guidance is not None:
                kind.state["guidance"] = args.kind_guidance  # this run's copy only
        if args.class_samples and "kind" not in trained.samplers:
            raise UserError(f"--class-samples: {args.checkpoint} holds no kind sampler to draw classes from")
        if not config.holdout:
            raise UserError(f"{args.checkpoint} was trained without --holdout: it has no held-out photos to sweep on")
        common = dict(holdout=config.holdout, holdout_seed=config.seed, resize=config.resize)
        photos, names = dataset_images(args.data_dir, config.split, config.resolution, "held-out", **common)
        training, training_names = dataset_images(args.data_dir, config.split, config.resolution, "train",
                                                            **common)
        judge = evaluation.VariationJudge(model, photos, flower_classes(args.data_dir, names), training,
                                          flower_classes(args.data_dir, training_names))
        if args.plot and (judge.predict is None or not judge.real_spread):
            raise UserError("the plot needs species kept and diversity: photos with Flowers102 labels, two of them "
                            "of one species among the held-out photos")
        by_class = None
        if args.class_samples:  # first: a model or data it cannot measure stops the run before the sweep
            by_class = judge.class_samples(trained.samplers["kind"], args.class_samples,
                                           torch.Generator().manual_seed(args.seed))
            print(json.dumps(by_class), flush=True)
        points = []
        for mode in args.modes:
            inference.variation_mode(trained.samplers, mode, args.checkpoint)  # or a one-line error now
            strengths = args.strengths if mode == args.modes[0] else args.baseline_strengths or args.strengths
            for strength in args.posterior_strengths if mode == "posterior" else strengths:
                result = judge.judge(trained.samplers, args.variations, strength, mode,
                                     torch.Generator().manual_seed(args.seed))
                points.append(result)
                print(json.dumps(result), flush=True)
        if args.plot:
            plot_sweep(points, args.plot)
        if args.grid:
            chosen = to_float(photos[random_subset(len(photos), args.grid_photos, args.seed)]).to(device)
            per_strength = 4
            rows = []
            for photo in chosen:
                row = [photo[None]]
                for strength in args.grid_strengths:
                    row.append(inference.variations(model, photo[None], per_strength, strength,
                                                    torch.Generator().manual_seed(args.seed), args.modes[0],
                                                    trained.samplers)[0])
                rows.append(torch.cat(row))
            nrow = 1 + per_strength * len(args.grid_strengths)
            inference.save_grid(torch.cat(rows), args.grid, nrow, inference.readable_scale(model.image_resolution))
        print(json.dumps({"checkpoint": args.checkpoint, "photos": len(photos), "points": points,
                          **({"class_samples": by_class} if by_class else {})}))
        return 0
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
