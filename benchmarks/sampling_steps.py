"""Sample FID against the way a diffusion sampler draws its samples: ancestral (DDPM) or deterministic (DDIM,
DPM-Solver++) steps, and how many, for a checkpoint's `kind` or `diffusion` sampler, in one run.

    python benchmarks/sampling_steps.py --data-dir DIR --checkpoint pretrained/flowers32.pt \
        --sampler kind --ways ddim:10 ddim:25 ddim:100 dpm:10 ddpm:50 ddpm:100 ddpm:250

Each way is METHOD:STEPS, a method of vae/diffusion_prior.py's denoise and its number of reverse steps. The kind
sampler's ways are also measured at each of --code-noises: the noise drawn around each code its mixture gives, as
the fit drew noise around the training codes. Every way draws --samples samples from the same seed, and they are
compared with the photos of --reference-split that the VAE never saw ('holdout': the run's own --holdout photos,
as the shipped models were trained). Only the way of drawing changes: the fitted networks are the checkpoint's.
The last line printed is one JSON object.
"""

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.prior_curve import reference_photos, sample_fid  # noqa: E402
from vae.diffusion_prior import DEFAULT_STEPS_OF, METHODS  # noqa: E402
from vae.fid import inception_features, load_inception  # noqa: E402
from vae.trained import load_model  # noqa: E402


def way(text):
    """METHOD:STEPS -> (method, steps), for argparse."""
    method, _, steps = text.partition(":")
    if method not in METHODS or not steps.isdigit() or int(steps) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not METHOD:STEPS with a method of {', '.join(METHODS)} and "
                                         f"at least one step, e.g. ddpm:100")
    return method, int(steps)


def default_way(sampler):
    """METHOD:STEPS of the sampler's own samples (the diffusion prior's: its fit's method, by default)."""
    method = sampler.sample_method or sampler.method
    return f"{method}:{sampler.sample_steps or DEFAULT_STEPS_OF[method]}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="the data the checkpoint trained on (a Flowers102 root)")
    parser.add_argument("--checkpoint", default="pretrained/flowers32.pt")
    parser.add_argument("--sampler", default="kind", choices=["kind", "diffusion"])
    parser.add_argument("--ways", nargs="+", type=way, default=[("ddim", 25), ("ddpm", 50), ("ddpm", 100)],
                        metavar="METHOD:STEPS")
    parser.add_argument("--code-noises", nargs="+", type=float, default=[0.0], metavar="S",
                        help="kind sampler: each way is also measured with N(0, S^2) drawn around each of the "
                             "mixture's codes, as its fit drew noise around the training codes (0: the codes as "
                             "drawn, as samples are)")
    parser.add_argument("--samples", type=int, default=1000, help="samples per FID")
    parser.add_argument("--reference-split", default="holdout",
                        help="photos the VAE never trained on; 'holdout': the run's own --holdout photos")
    parser.add_argument("--reference-images", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if min(args.code_noises) < 0:
        parser.error(f"--code-noises {min(args.code_noises):g}: a noise level is at least 0")
    if args.sampler != "kind" and args.code_noises != [0.0]:
        parser.error("--code-noises: only the kind sampler draws codes; leave it out with --sampler diffusion")
    if args.threads:
        torch.set_num_threads(args.threads)

    trained = load_model(args.checkpoint, "cpu")
    if args.sampler not in trained.samplers:
        parser.error(f"--sampler {args.sampler}: {args.checkpoint} holds no such sampler; it holds "
                     f"{', '.join(trained.samplers) or 'none'} (fit one with vae_inference.py export --fit-samplers)")
    reference, described = reference_photos(trained, args.data_dir, args.reference_split, args.reference_images,
                                            args.seed, parser)
    print(f"{args.sampler} sampler of {args.checkpoint}; FID against {len(reference)} photos of {described}",
          flush=True)
    extractor = load_inception("cpu")
    reference_features = inception_features(reference, extractor, progress=False)

    sampler = trained.samplers[args.sampler]
    results = {"checkpoint": Path(args.checkpoint).name, "sampler": args.sampler,
               "default": default_way(sampler),
               "fid_samples": args.samples, "fid_reference_images": len(reference),
               "threads": torch.get_num_threads(), "points": []}
    for (method, steps), code_noise in itertools.product(args.ways, args.code_noises):
        sampler.sample_method, sampler.sample_steps = method, steps  # this instance only
        point = {"method": method, "steps": steps}
        if args.sampler == "kind":
            sampler.sample_code_noise = point["code_noise"] = code_noise
        point.update(sample_fid(trained.model, sampler, reference_features, extractor, args.samples, args.seed))
        results["points"].append(point)
        print(point, flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
