"""Sample FID against fitting minutes for the latent diffusion prior: the flat denoiser of earlier fits against the
U-Net, each fitted to a trained VAE's posteriors for several budgets of minutes, in one run.

    python benchmarks/prior_curve.py --data-dir DIR --checkpoint pretrained/flowers32.pt --minutes 1.5 3 6 12
    python benchmarks/prior_curve.py --data-dir DIR --designs flat unet --minutes 2 --samples 250   # quicker
    python benchmarks/prior_curve.py --data-dir DIR --checkpoint runs/flowers64/checkpoint.pt \
        --reference-split holdout --designs unet --minutes 4 8 16

Designs:
  flat   the prior of earlier fits: residual blocks at the latent's resolution (width 128, 4 blocks), float32,
         the unweighted v loss, DDPM's 50 ancestral steps to sample
  unet   vae/denoisers.py's U-Net (width 32 at the latent's resolution, 64 and 128 below), bf16 autocast where
         native, min-SNR-5 loss weighting, 25 deterministic DDIM steps to sample

Each fit is given a number of steps: the budget of minutes times the design's steps per second, measured on this
machine just before (so that the fit takes about that long; its measured seconds are reported). The VAE is the
checkpoint's; the prior is fitted to the posteriors of the images it trained on (its own hold-out left out, its
mirror images added when it trained with them), and its samples are compared with --reference-images photos of
--reference-split that it never saw. The checkpoint's own diffusion prior, when it has one, is measured too.
--batch and --lr set the latents per step and Adam's learning rate of every fit of the run (the shipped fits: 128,
and the design's rate), so that a larger batch can be judged by the FID it reaches in the same minutes.
The last line printed is one JSON object.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vae.diffusion_prior import ARCHITECTURE_DEFAULTS, DiffusionPrior, fit_diffusion_prior  # noqa: E402
from vae.fid import fid_kid, inception_features, load_inception  # noqa: E402
from vae.inference import sample_images  # noqa: E402
from vae.samplers import Posteriors  # noqa: E402
from vae.trained import load_model  # noqa: E402

DESIGNS = {
    "flat": {"architecture": "flat", "amp": False, "min_snr": False, "sampling": "ddpm"},
    "unet": {"architecture": "unet", "amp": None, "min_snr": True, "sampling": "ddim"},
}


def steps_per_second(means, stds, latent_shape, design, seconds=15.0):
    """The design's fitting steps per second here: a short fit, timed after its first steps."""
    probe_steps = 5
    start = time.perf_counter()
    fit_diffusion_prior(means, stds, latent_shape, steps=probe_steps, **design)
    warm = time.perf_counter() - start
    steps = max(probe_steps + 1, int(probe_steps * seconds / max(warm, 1e-3)))
    start = time.perf_counter()
    fit_diffusion_prior(means, stds, latent_shape, steps=steps, **design)
    return steps / (time.perf_counter() - start)


def sample_fid(model, prior, reference_features, extractor, num_samples, seed, batch_size=250):
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    images = torch.cat([sample_images(model, prior, min(batch_size, num_samples - first), 1.0, generator)[0]
                        for first in range(0, num_samples, batch_size)])
    sampling_seconds = time.perf_counter() - start
    measured = fid_kid(reference_features, inception_features(images, extractor, progress=False))
    return {"fid": round(measured["fid"], 2), "kid": round(measured["kid"], 5),
            "sampling_seconds": round(sampling_seconds, 1)}


def reference_photos(trained, data_dir, split, count, seed, parser):
    """(count photos of `split` drawn with the seed, their description): photos the VAE never trained on; split
    "holdout" is the run's own hold-out, for a run that trained on the test photos too (as the shipped models)."""
    if split == "holdout":
        if not trained.config.holdout:
            parser.error(f"--reference-split holdout: {trained.path} was trained without --holdout")
        photos, _, described = trained.data.evaluation_images(data_dir, holdout=trained.config.holdout)
    else:
        photos, _, described = trained.data.evaluation_images(data_dir, split=split)
    chosen = torch.randperm(len(photos), generator=torch.Generator().manual_seed(seed))
    return photos[chosen[:count]], described


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="the data the checkpoint trained on (a Flowers102 root)")
    parser.add_argument("--checkpoint", default="pretrained/flowers32.pt")
    parser.add_argument("--designs", nargs="+", default=list(DESIGNS), choices=list(DESIGNS))
    parser.add_argument("--minutes", nargs="+", type=float, default=[1.5, 3.0, 6.0, 12.0])
    parser.add_argument("--samples", type=int, default=1000, help="samples per FID")
    parser.add_argument("--reference-split", default="test",
                        help="photos the VAE never trained on; 'holdout': the run's own --holdout photos")
    parser.add_argument("--reference-images", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--probe-seconds", type=float, default=15.0,
                        help="seconds of fitting that measure each design's steps per second")
    parser.add_argument("--batch", type=int, default=128,
                        help="latents per fitting step (the shipped fits use 128)")
    parser.add_argument("--lr", type=float, default=None,
                        help="Adam's learning rate (default: the design's, 2e-3 flat, 1e-3 unet)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shipped", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure the checkpoint's own diffusion prior, when it has one")
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error(f"--batch {args.batch}: a fit needs at least one latent per step; pass 128, as the shipped fits")
    if args.lr is not None and not args.lr > 0:
        parser.error(f"--lr {args.lr:g}: a learning rate is positive; leave it out for the design's own")
    if args.threads:
        torch.set_num_threads(args.threads)

    trained = load_model(args.checkpoint, "cpu")
    images, _, described = trained.data.training_images(args.data_dir)
    posteriors = Posteriors.of(trained.model, images, hflip=trained.config.hflip)
    means, stds = posteriors.all()
    latent_shape = posteriors.latent_shape
    reference, reference_described = reference_photos(trained, args.data_dir, args.reference_split,
                                                      args.reference_images, args.seed, parser)
    print(f"fitting to {described}; {len(means)} posteriors of shape {latent_shape}; FID against "
          f"{len(reference)} photos of {reference_described}", flush=True)
    extractor = load_inception("cpu")
    reference_features = inception_features(reference, extractor, progress=False)

    results = {"checkpoint": Path(args.checkpoint).name, "latent_shape": list(latent_shape),
               "fid_samples": args.samples, "fid_reference_images": len(reference), "threads": torch.get_num_threads(),
               "points": []}
    if args.shipped and "diffusion" in trained.samplers:
        shipped = trained.samplers["diffusion"]
        results["shipped"] = {"steps": shipped.state["steps"],
                              **sample_fid(trained.model, shipped, reference_features, extractor, args.samples,
                                           args.seed)}
        print(f"the checkpoint's own prior ({shipped.state['steps']} steps): {results['shipped']}", flush=True)
    for name in args.designs:
        design = {**DESIGNS[name], "batch_size": args.batch,
                  "lr": args.lr or ARCHITECTURE_DEFAULTS[DESIGNS[name]["architecture"]]["lr"]}
        rate = steps_per_second(means, stds, latent_shape, design, args.probe_seconds)
        print(f"{name}: {rate:.2f} steps/s", flush=True)
        for minutes in args.minutes:
            steps = max(20, round(minutes * 60 * rate))
            start = time.perf_counter()
            prior = DiffusionPrior(fit_diffusion_prior(means, stds, latent_shape, steps=steps, seed=args.seed,
                                                       **design))
            point = {"design": name, "batch": design["batch_size"], "lr": design["lr"],
                     "minutes_asked": minutes, "steps": steps,
                     "fit_minutes": round((time.perf_counter() - start) / 60, 2),
                     **sample_fid(trained.model, prior, reference_features, extractor, args.samples, args.seed)}
            results["points"].append(point)
            print(point, flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
