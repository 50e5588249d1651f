"""The designs of the "kind" sampler (vae/kind_prior.py) measured side by side, in one run: each is fitted to a
checkpoint's training photos, then its variations of photos the model never trained on are judged as
`vae_inference.py evaluate --variations` judges them (species kept, diversity, FID of the variations), and its
samples get an FID. The checkpoint's own variation mode (SDEdit on the diffusion prior) is measured beside them.

    python benchmarks/kind_designs.py --data-dir DATA_DIR --checkpoint pretrained/flowers32.pt --steps 3000 \\
        --split test --photos 250 --save-dir fitted/

A checkpoint that trained on the test photos (the shipped ones) is judged on its own hold-out: --split holdout.
Designs (--designs): "neighbour" (the code of another photo of the same class, or of a near neighbour without
classes), "self" (the photo's own code: a diffusion autoencoder over the latent), "self-class" (the same, its code
also trained to tell the photo's class through a linear read-out, where the photos have labels), "self-64" (the
photo's own code of 64 numbers instead of 16) and "self-noise" (the photo's own code with noise of standard
deviation 1 added to each of its numbers, in the fit and in variations: a code of at most 8 bits). --code-noise S
fits every chosen design with noise S instead (16 numbers of variance 1 then carry at most 8 log2(1 + 1/S^2) bits).
--save-dir keeps each fitted checkpoint (kind-<design>.pt, kind-<design>-noise<S>.pt with --code-noise), so that the
better one can be shipped without fitting it again.
The last line printed is one JSON object.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.prior_curve import sample_fid  # noqa: E402
from datasets.folders import flower_classes  # noqa: E402
from vae.checkpoint import export_for_inference  # noqa: E402
from vae.evaluation import VariationJudge  # noqa: E402
from vae.fid import inception_features  # noqa: E402
from vae.inference import DEFAULT_STRENGTH  # noqa: E402
from vae.kind_prior import KIND_STRENGTH, KindPrior, fit_kind_prior  # noqa: E402
from vae.samplers import Posteriors  # noqa: E402
from vae.trained import load_model  # noqa: E402


# Each design: the options of fit_kind_prior it fits with.
DESIGNS = {
    "neighbour": {"pairing": "neighbour", "class_weight": 0.0, "code_noise": 0.0},
    "self": {"pairing": "self", "class_weight": 0.0, "code_noise": 0.0},
    "self-class": {"pairing": "self", "class_weight": 0.1, "code_noise": 0.0},
    "self-64": {"pairing": "self", "class_weight": 0.0, "code_size": 64, "code_noise": 0.0},
    "self-noise": {"pairing": "self", "class_weight": 0.0, "code_noise": 1.0},  # the default of new fits
}


def rounded(result):
    return {key: round(value, 4) if isinstance(value, float) else value for key, value in result.items()
            if key in ("variation_mode", "variation_strength", "species_kept", "species_accuracy_real",
                       "species_kept_reconstructions", "variation_diversity", "variation_fid")}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="the Flowers102 root the checkpoint trained on")
    parser.add_argument("--checkpoint", default="pretrained/flowers32.pt")
    parser.add_argument("--designs", nargs="+", default=list(DESIGNS), choices=list(DESIGNS))
    parser.add_argument("--steps", type=int, default=3000, help="fitting steps of each design")
    parser.add_argument("--split", default="test", help="split of the judged photos (never trained on); 'holdout': "
                        "the checkpoint's own held-out photos, in order")
    parser.add_argument("--photos", type=int, default=250, help="judged photos, a seeded draw of --split")
    parser.add_argument("--variations", type=int, default=4, help="variations of each photo")
    parser.add_argument("--strengths", nargs="+", type=float, default=[KIND_STRENGTH])
    parser.add_argument("--guidances", nargs="+", type=float, default=None,
                        help="classifier-free guidance scales to judge each design at (default: the fitted one)")
    parser.add_argument("--fid-samples", type=int, default=1000, help="samples per FID (0: none)")
    parser.add_argument("--reference-images", type=int, default=1000, help="photos of --split the FID compares with")
    parser.add_argument("--code-noise", type=float, default=None,
                        help="fit every design with this code noise instead of its own (at least 0)")
    parser.add_argument("--save-dir", default="", help="keep each fitted checkpoint here")
    parser.add_argument("--reuse", action="store_true", help="judge the checkpoints --save-dir holds from an earlier "
                        "run (kind-<design>.pt) instead of fitting again")
    parser.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure the checkpoint's own diffusion mode at the default strength")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.code_noise is not None and args.code_noise < 0:
        parser.error(f"--code-noise must be at least 0 (got {args.code_noise}); 0 fits a code without noise")

    trained = load_model(args.checkpoint, "cpu")
    model = trained.model
    training, training_names, described = trained.data.training_images(args.data_dir)
    training_classes = flower_classes(args.data_dir, training_names)
    posteriors = Posteriors.of(model, training, trained.config.hflip, training_classes)
    if args.split == "holdout":
        photos, names, photos_described = trained.data.evaluation_images(args.data_dir,
                                                                         holdout=trained.config.holdout)
        order = torch.arange(len(photos))
    else:
        photos, names, photos_described = trained.data.evaluation_images(args.data_dir, split=args.split)
        order = torch.randperm(len(photos), generator=torch.Generator().manual_seed(args.seed))
    reference = photos[order[:args.reference_images]]
    chosen = order[:args.photos]
    photos, classes = photos[chosen], [flower_classes(args.data_dir, names)[i] for i in chosen.tolist()]
    print(f"fitting to the {described}; judging {len(photos)} photos of {photos_described}", flush=True)
    judge = VariationJudge(model, photos, classes, training, training_classes)
    reference_features = inception_features(reference, judge.extractor, progress=False) if args.fid_samples else None
    results = {"checkpoint": Path(args.checkpoint).name, "photos": len(photos), "variations": args.variations,
               "fid_samples": args.fid_samples, "fid_reference_images": len(reference), "points": []}

    def measure(design, samplers, mode, strengths, sampler, extra):
        fitted = sampler.state.get("guidance")
        for guidance in args.guidances if mode == "kind" and args.guidances else [fitted]:
            if mode == "kind":
                sampler.state["guidance"] = guidance
            for strength in strengths:
                point = {"design": design, **extra, **({"guidance": guidance} if mode == "kind" else {}),
                         **rounded(judge.judge(samplers, args.variations, strength, mode,
                                               torch.Generator().manual_seed(args.seed)))}
                if args.fid_samples and strength == strengths[0]:
                    point.update(sample_fid(model, sampler, reference_features, judge.extractor, args.fid_samples,
                                            args.seed))
                results["points"].append(point)
                print(json.dumps(point), flush=True)
        if mode == "kind":
            sampler.state["guidance"] = fitted

    if args.baseline and "diffusion" in trained.samplers:
        measure("diffusion (the checkpoint's)", trained.samplers, "diffusion", [DEFAULT_STRENGTH],
                trained.samplers["diffusion"], {})
    for design in args.designs:
        options = dict(DESIGNS[design], **({} if args.code_noise is None else {"code_noise": args.code_noise}))
        noise = "" if args.code_noise is None else f"-noise{args.code_noise:g}"
        path = Path(args.save_dir) / f"kind-{design}{noise}.pt"
        if args.reuse:
            prior = load_model(path, "cpu").sampler("kind")
            measure(design, {"kind": prior}, "kind", args.strengths, prior,
                    {"steps": prior.state["steps"], "partners": prior.state["partners"],
                     "code_noise": prior.state.get("code_noise", 0.0)})
            continue
        means, stds = posteriors.all()
        start = time.perf_counter()
        state = fit_kind_prior(means, stds, posteriors.latent_shape, posteriors.all_classes(), **options,
                               steps=args.steps, seed=args.seed, progress=False)
        minutes = round((time.perf_counter() - start) / 60, 2)
        prior = KindPrior(state)
        if args.save_dir:
            path.parent.mkdir(parents=True, exist_ok=True)
            checkpoint = trained.checkpoint
            export_for_inference({**checkpoint, "samplers": {**(checkpoint.get("samplers") or {}), "kind": state}},
                                 path)
        measure(design, {"kind": prior}, "kind", args.strengths, prior,
                {"steps": args.steps, "fit_minutes": minutes, "partners": state["partners"],
                 "code_noise": options["code_noise"]})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
