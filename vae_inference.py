"""Use a trained VAE: new flowers, reconstructions, variations of your own photo, interpolation, latent
traversals, and honest evaluation. The checkpoint's config rebuilds the model; no training flag is repeated.

    python vae_inference.py sample --checkpoint runs/NAME/checkpoint.pt --num 64 --out samples.png
    python vae_inference.py reconstruct --checkpoint C --data-dir DIR --split test --num 16 --out rec.png
    python vae_inference.py variations --checkpoint C --images a.jpg b.jpg --num 8 --out-dir variations/
    python vae_inference.py interpolate --checkpoint C --images a.jpg b.jpg --steps 10 --slerp --out path.png
    python vae_inference.py traverse --checkpoint C --image a.jpg --range 3 --steps 9 --out traverse.png
    python vae_inference.py evaluate --checkpoint C --data-dir DIR --split train --holdout-from-checkpoint
"""

import vae.quiet_start  # first: Ctrl-C while the libraries below load exits at once (see its docstring)

import argparse
import math
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from datasets.batches import ImageBatches, random_subset, to_float
from datasets.folders import class_labels, flower_classes, folder_files, images_folder, inside_images_folder
from vae import evaluation, inference
from vae.checkpoint import export_for_inference
from vae.config import check_fid_sizes, check_ranges
from vae.device import DEVICES, model_device, pick_device
from vae.diffusion_prior import DEFAULT_STEPS as DIFFUSION_STEPS
from vae.errors import MissingData, MissingSampler, UserError
from vae.files import write_failure, write_text_atomically
from vae.logs import log_projector, writer_thread_errors
from vae.metrics import psnr_db
from vae.kind_prior import CODE_NOISE, DEFAULT_STEPS as KIND_STEPS, WALK_RANGE, KindPrior
from vae.samplers import SAMPLERS, check_enough_images, fit_samplers, ranked
from vae.threads import choose_threads, describe
from vae.trained import load_model

# The shipped model (recipes/flowers32.json): the default --checkpoint of the scripts and the page.
PRETRAINED = Path(__file__).resolve().parent / "pretrained" / "flowers32.pt"


# ------------------------------------------------------------------------------------------- arguments

def add_common(parser, makes_images=True, default_out=None):
    parser.add_argument("--checkpoint", default=str(PRETRAINED), help="checkpoint.pt (or best.pt) of a training "
                        "run; the default is the model shipped with the repository")
    parser.add_argument("--device", default="auto", choices=DEVICES,
                        help="where to run (auto: cuda, then mps, then cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw, for reproducible output")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads torch uses (0: 1 thread and all cores "
                        "are timed on a batch of decoding, the faster kept)")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    if makes_images:
        parser.add_argument("--out", default=default_out, help="PNG file the image grid is written to")
        parser.add_argument("--scale", type=int, default=None,
                            help="upscale each image by this integer factor (nearest neighbour) in the grid "
                                 "(default: about 96 pixels per image, 3 for 32x32, 2 for 64x64)")


def add_data(parser, split_default, what):
    parser.add_argument("--data-dir", default=None,
                        help=f"Flowers102 root of the {what} (default: the checkpoint's --data-dir)")
    default_text = split_default or "the checkpoint's split with a hold-out, else test"
    parser.add_argument("--split", default=split_default,
                        help=f"split of the {what}, or several joined with + (default: {default_text})")
    parser.add_argument("--cache-dir", default="", help="where the decoded-image cache goes when DATA_DIR is "
                        "not writable (empty: the training run's --cache-dir)")


def fitted_samplers():
    """The registered samplers that are fitted to a run's images, best first."""
    return [name for name in ranked(SAMPLERS) if SAMPLERS[name].needs_fitting]


def add_sampler(parser):
    names = ranked(SAMPLERS)
    described = "; ".join(f"{name}: {SAMPLERS[name].description}" for name in names)
    parser.add_argument("--sampler", default="auto", choices=("auto", *names),
                        help=f"where z comes from: the prior, or a sampler fitted to the training images' posteriors "
                             f"and stored in the checkpoint. auto: the first of {', '.join(names)} it has; "
                             f"{described}")
    parser.add_argument("--temperature", type=float, default=1.0, help="spread of the draws: z ~ N(0, T^2 I) for "
                        "the prior; below 1 trades variety for typical images")


def add_variation_mode(parser):
    modes = inference.variation_modes()
    described = "; ".join(f"{name}: {text}" for name, text in modes.items())
    parser.add_argument("--mode", default="auto", choices=("auto", *modes),
                        help=f"how variations are made. auto: the first of {', '.join(modes)} the checkpoint "
                             f"can run; {described}")
    parser.add_argument("--strength", type=float, default=inference.DEFAULT_STRENGTH,
                        help="how far variations go from the photo, from 0 (its reconstruction) through about 0.2 "
                             "(another flower of the same kind, posed and shaped anew) to 1 (any flower)")


def add_walk(parser, what):
    parser.add_argument("--walk", default="auto", choices=("auto", "code", "latent"),
                        help=f"what is walked. {what}. auto: code when the checkpoint has the kind sampler")


def add_holdout(parser):
    group = parser.add_argument_group("hold-out (the images a training run with --holdout kept aside)")
    group.add_argument("--holdout-from-checkpoint", action="store_true",
                       help="use exactly the held-out images of the checkpoint's run (its --holdout and --seed)")
    group.add_argument("--holdout", type=float, default=0.0,
                       help="use the fraction HOLDOUT held out of the split by a run with --holdout HOLDOUT "
                            "(0: the whole split)")
    group.add_argument("--holdout-seed", type=int, default=None,
                       help="--seed of that training run (default: the checkpoint's seed)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults in --help, except None: those flags say in words what they default to."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    defaults = HelpFormatter

    sample = commands.add_parser("sample", help="new images from the prior or a fitted latent sampler",
                                 formatter_class=defaults)
    add_common(sample, default_out="outputs/samples.png")
    sample.add_argument("--num", type=int, default=64, help="number of images")
    add_sampler(sample)
    sample.add_argument("--out-dir", default=None, help="also write each image to OUT_DIR/sample_NNN.png")
    sample.add_argument("--nrow", type=int, default=8, help="images per grid row")
    like = sample.add_mutually_exclusive_group()
    like.add_argument("--like", default=None, metavar="PHOTO", help="new flowers of this photo's kind: its code "
                      "kept, the rest drawn (needs the kind sampler)")
    like.add_argument("--class", type=int, default=None, dest="class_", metavar="N", help="new flowers of class N "
                      "of the training data (Flowers102: 1 to 102; class sub-folders: 1, 2, ... in name order)")

    reconstruct = commands.add_parser("reconstruct", help="originals above their reconstructions",
                                      formatter_class=defaults)
    add_common(reconstruct, default_out="outputs/reconstructions.png")
    reconstruct.add_argument("--images", nargs="+", default=None, help="image files (any size or format) or "
                             "folders of them; else --num images of --data-dir/--split")
    add_data(reconstruct, None, "images")
    add_holdout(reconstruct)
    reconstruct.add_argument("--num", type=int, default=16, help="images drawn at random (seeded by --seed) from "
                             "the split, whose lists are sorted by class")
    reconstruct.add_argument("--nrow", type=int, default=8, help="images per grid row")

    variations = commands.add_parser("variations", help="new flowers of the kind of your photo(s)",
                                     formatter_class=defaults)
    add_common(variations, default_out="outputs/variations.png")
    variations.add_argument("--images", "--image", nargs="+", required=True, dest="images",
                            help="one or more image files (JPEG/PNG, any size, RGBA or grey) or folders of them")
    variations.add_argument("--num", type=int, default=14, help="variations of each photo")
    add_variation_mode(variations)
    variations.add_argument("--out-dir", default=None, help="write each variation to OUT_DIR/<photo name>-<k>.png "
                            "instead of one grid to --out")
    variations.add_argument("--data-dir", default=None, help="Flowers102 root: print each variation's distance "
                            "to its nearest training image (the images the checkpoint was trained on)")
    variations.add_argument("--split", default=None, help="split(s) of those training images (default: the "
                            "checkpoint's --split)")
    variations.add_argument("--cache-dir", default="", help="image cache folder when DATA_DIR is not writable "
                            "(empty: the training run's --cache-dir)")

    interpolate = commands.add_parser("interpolate", help="decode the path between two encodings",
                                      formatter_class=defaults)
    add_common(interpolate, default_out="outputs/interpolation.png")
    interpolate.add_argument("--images", nargs=2, required=True, metavar=("A", "B"), help="two image files")
    interpolate.add_argument("--steps", type=int, default=10, help="decoded points, endpoints included")
    interpolate.add_argument("--slerp", action="store_true", help="spherical instead of linear interpolation")
    add_walk(interpolate, "code: the codes of the two photos' kinds and their noises walked together (the kind "
             "sampler); latent: the straight (or --slerp) path between the posterior means")

    traverse = commands.add_parser("traverse", help="sweep each latent dimension, one row each",
                                   formatter_class=defaults)
    add_common(traverse, default_out="outputs/traverse.png")
    traverse.add_argument("--image", default=None, help="sweep around this image's code or posterior mean (else "
                          "the training codes' mean, or z = 0)")
    traverse.add_argument("--range", type=float, default=None, help="each row goes from -RANGE to +RANGE: code "
                          f"spreads along a principal direction (default {WALK_RANGE:g}), or latent units (default 3)")
    traverse.add_argument("--steps", type=int, default=9, help="images per row")
    traverse.add_argument("--dims", type=int, default=None, help="rows: the DIMS principal directions of the code "
                          "(default 8), or the DIMS most active latent dimensions (largest held-out KL in the "
                          "checkpoint's evaluation; default 10); 0 for all of them")
    add_walk(traverse, "code: the code of the flower's kind along its principal directions, the rest drawn from the "
             "same noise (the kind sampler); latent: one latent dimension per row")

    evaluate = commands.add_parser("evaluate", help="ELBO, IWAE bound, bits/dim, PSNR, active units",
                                   formatter_class=defaults)
    add_common(evaluate, makes_images=False)
    add_data(evaluate, None, "evaluation images")
    add_holdout(evaluate)
    evaluate.add_argument("--iw-samples", type=int, default=100, help="importance samples K of the IWAE bound")
    evaluate.add_argument("--batch-size", type=int, default=64, help="images encoded at once")
    evaluate.add_argument("--json", default=None, help="also write the results to this JSON file")
    evaluate.add_argument("--fid-samples", type=int, default=0, help="also compare this many generated images "
                          "with the evaluated images: FID, KID and the reconstructions' FID (needs "
                          "requirements-metrics.txt; about 3 images/s on two CPU cores)")
    evaluate.add_argument("--variations", type=int, default=0, help="also make this many variations of each "
                          "image (--mode, --strength) and measure them: species kept, diversity, FID, distance to "
                          "the nearest training image (needs requirements-metrics.txt)")
    add_variation_mode(evaluate)
    add_sampler(evaluate)

    projector = commands.add_parser("projector", help="posterior means, thumbnails and flower classes for "
                                    "TensorBoard's PROJECTOR", formatter_class=defaults)
    add_common(projector, makes_images=False)
    add_data(projector, None, "images")
    add_holdout(projector)
    projector.add_argument("--log-dir", default="runs/projector", help="folder to write; then tensorboard --logdir it")

    export = commands.add_parser("export", help="a small copy of a checkpoint for inference and sharing",
                                 formatter_class=defaults)
    add_common(export, makes_images=False)
    export.add_argument("--out", required=True, help="where the exported checkpoint goes (e.g. pretrained/mine.pt)")
    export.add_argument("--fit-samplers", nargs="*", default=None, choices=fitted_samplers(), metavar="KIND",
                        help=f"fit latent samplers to the posteriors of the images the run trained on (needs the "
                             f"data: --data-dir) and store them; with no KIND all of {', '.join(fitted_samplers())}")
    export.add_argument("--drop-samplers", nargs="+", default=[], metavar="KIND",
                        help="leave these stored samplers out of the export (e.g. gmm, whose full covariances "
                             "outweigh the model at large latents)")
    export.add_argument("--diffusion-steps", type=int, default=DIFFUSION_STEPS,
                        help="training steps of the diffusion prior (docs/prior.md has its curve of sample FID "
                             "against fitting minutes)")
    export.add_argument("--kind-steps", type=int, default=KIND_STEPS,
                        help="training steps of the kind sampler (docs/kind.md measures 3,000 to 24,000)")
    export.add_argument("--kind-code-noise", type=float, default=CODE_NOISE,
                        help="standard deviation added to each number of the kind sampler's code in its fit and its "
                             "variations (0: none; docs/kind.md)")
    add_data(export, None, "training images")
    return parser


# --------------------------------------------------------------------------------------------- helpers

def expand_folders(paths):
    """The image files of --images: a file as given, a folder as the images in it and in its sub-folders (one
    level, as a data folder is read), sorted."""
    expanded = []
    for path in map(Path, paths):
        if path.is_dir():
            files = folder_files(path)
            if not files:
                raise UserError(f"--images {path} is a folder with no images in it (or in its sub-folders); pass "
                                f"image files or a folder of JPEG/PNG/WebP photos")
            expanded += [str(file) for file in files]
        else:
            expanded.append(str(path))
    return expanded


def load_photos(paths, trained):
    """Image files preprocessed as the checkpoint's training images were (its --resize), on the model's device."""
    return inference.load_images(paths, trained.model, model_device(trained.model), trained.config.resize)


def holdout_settings(args, trained):
    """(fraction, seed) of the held-out set asked for; fraction 0 means the whole split."""
    config = trained.config
    if args.holdout_from_checkpoint:
        if not config.holdout:
            raise UserError(f"{args.checkpoint} was trained without --holdout, so it has no held-out images; "
                            f"drop --holdout-from-checkpoint and pass --split")
        return config.holdout, config.seed if args.holdout_seed is None else args.holdout_seed
    return args.holdout, config.seed if args.holdout_seed is None else args.holdout_seed


def split_images(args, trained):
    """(uint8 images, names, description) of --data-dir/--split, restricted to the hold-out when asked."""
    holdout, seed = holdout_settings(args, trained)
    return trained.data.evaluation_images(args.data_dir, args.split, holdout, seed, args.cache_dir,
                                          holdout_wording=f"held out by --holdout {holdout} --seed {seed}")


def training_images(args, trained):
    """(uint8 images, names, description) of the images the checkpoint's run trained on."""
    return trained.data.training_images(args.data_dir, args.split, args.cache_dir)


def data_dir_of(args, trained):
    """--data-dir, or the training run's own."""
    return args.data_dir or trained.config.data_dir


def generator_for(args):
    return torch.Generator().manual_seed(args.seed)


def report_grid(path, count, nrow, what):
    print(f"wrote {path}: {what} ({count} images, {min(nrow, count)} per row)")


# ------------------------------------------------------------------------------------------- commands

def chosen_sampler(args, trained):
    """The name of the --sampler asked for (auto: the best one the checkpoint holds)."""
    args.sampler = trained.best_sampler() if args.sampler == "auto" else args.sampler
    return args.sampler


def walks_code(args, trained):
    """Whether --walk asks for (or, auto, allows) a walk of the kind sampler's code."""
    if args.walk == "code":
        trained.sampler(KindPrior.name)  # or a one-line error that says how to fit it
    return args.walk == "code" or (args.walk == "auto" and KindPrior.name in trained.samplers)


def check_grid(args, trained, count):
    inference.check_grid_size(count, trained.model.image_resolution, args.scale)


def run_sample(args, trained):
    check_grid(args, trained, args.num)
    if args.like or args.class_ is not None:
        kind = trained.sampler(KindPrior.name)
        if args.like:
            code = inference.kind_codes(trained.model, kind, load_photos([args.like], trained))
            what = f"new flowers of the kind of {args.like}"
        else:
            code = kind.class_code(args.class_)
            what = f"new flowers of class {args.class_}"
        images, _ = inference.samples_of_kind(trained.model, kind, code, args.num, args.temperature,
                                              generator_for(args))
    else:
        sampler = trained.sampler(chosen_sampler(args, trained))
        images, _ = inference.sample_images(trained.model, sampler, args.num, args.temperature, generator_for(args))
        what = f"{args.sampler} samples"
    path = inference.save_grid(images, args.out, args.nrow, args.scale)
    report_grid(path, args.num, args.nrow, f"{what} at temperature {args.temperature}")
    if args.out_dir:
        for i, image in enumerate(images):
            inference.save_grid(image[None], Path(args.out_dir) / f"sample_{i:03d}.png", 1, args.scale)
        print(f"wrote {args.num} single images to {args.out_dir}")


def run_reconstruct(args, trained):
    model = trained.model
    check_grid(args, trained, 2 * (len(args.images) if args.images else args.num))
    if args.images:
        x = load_photos(args.images, trained)
        source = f"{len(args.images)} image file(s)"
    else:
        images, _, source = split_images(args, trained)
        x = to_float(images[random_subset(len(images), args.num, args.seed)]).to(model_device(model))
    reconstructions = inference.reconstruct(model, x)
    nrow = min(args.nrow, len(x))
    grid = inference.interleave_rows(x, reconstructions, nrow)
    path = inference.save_grid(grid, args.out, nrow, args.scale)
    mse = (reconstructions - x).pow(2).mean().item()
    report_grid(path, len(grid), nrow, f"originals (odd rows) above reconstructions (even rows) of {source}; "
                f"PSNR {psnr_db(mse):.2f} dB")


def run_variations(args, trained):
    model = trained.model
    mode = inference.variation_mode(trained.samplers, args.mode, args.checkpoint)
    stems = [Path(path).stem for path in args.images]
    if args.out_dir and len(set(stems)) < len(stems):
        twice = next(stem for stem in stems if stems.count(stem) > 1)
        raise UserError(f"two of --images are named {twice}, so their variations would overwrite each other in "
                        f"{args.out_dir}; rename one, or pass --out for one grid")
    if not args.out_dir:
        check_grid(args, trained, len(args.images) * (args.num + 2))
    x = load_photos(args.images, trained)
    images, _, means = inference.variations(model, x, args.num, args.strength, generator_for(args), mode,
                                            trained.samplers)
    with torch.no_grad():  # decoded from the posterior means the variations started from
        reconstructions = model.decode(means)
    what = f"{args.num} {mode} variations at strength {args.strength:g}"
    if args.out_dir:
        for stem, photo_variations in zip(stems, images.split(args.num)):
            for k, image in enumerate(photo_variations, start=1):
                inference.save_grid(image[None], Path(args.out_dir) / f"{stem}-{k}.png", 1, args.scale)
        print(f"wrote {len(images)} images to {args.out_dir}: {what} of each of {len(x)} photo(s), "
              f"named <photo>-<k>.png")
    else:
        rows = [torch.cat([photo[None], reconstruction[None], varied]) for photo, reconstruction, varied
                in zip(x, reconstructions, images.split(args.num))]
        # One photo's grid is square (16 images: 4 x 4), not a strip; several photos get a row each.
        nrow = math.ceil((args.num + 2) ** 0.5) if len(x) == 1 else args.num + 2
        layout = "in reading order" if len(x) == 1 else "a row per photo"
        path = inference.save_grid(torch.cat(rows), args.out, nrow, args.scale)
        report_grid(path, len(x) * (args.num + 2), nrow, f"{layout}: the photo, its reconstruction, then {what}")
    if args.data_dir:
        print_nearest_training_images(args, trained, x, reconstructions, images)


def print_nearest_training_images(args, trained, x, reconstructions, variations):
    """How far each image is from the closest image the model trained on (RMSE, 0-255 scale)."""
    training, names, described = training_images(args, trained)
    print(f"distance to the nearest of the {described}: RMSE per pixel, 0-255 scale")
    for path, photo, reconstruction, varied in zip(args.images, x, reconstructions, variations.split(args.num)):
        rows = [(Path(path).name, photo[None]), ("reconstruction", reconstruction[None])] + \
               [(f"variation {i + 1}", image[None]) for i, image in enumerate(varied)]
        for label, image in rows:
            distance, index = evaluation.nearest_distances(image, training)
            print(f"  {label:<16} {distance.item():7.2f}   nearest: {names[index.item()]}")


def run_interpolate(args, trained):
    check_grid(args, trained, args.steps + 2)
    x = load_photos(args.images, trained)
    if walks_code(args, trained):
        path_images = inference.interpolate_codes(trained.model, trained.sampler(KindPrior.name), x[:1], x[1:],
                                                  args.steps)
        what = "the path between the codes of their kinds (and their noises)"
    else:
        path_images = inference.interpolate(trained.model, x[:1], x[1:], args.steps, spherical=args.slerp)
        what = f"the {'spherical' if args.slerp else 'linear'} path between the posterior means"
    grid = torch.cat([x[:1], path_images, x[1:]])
    path = inference.save_grid(grid, args.out, len(grid), args.scale)
    report_grid(path, len(grid), len(grid), f"image A, {args.steps} decoded points of {what}, image B")


def run_traverse(args, trained):
    if walks_code(args, trained):
        return traverse_code(args, trained)
    args.range = 3.0 if args.range is None else args.range
    args.dims = 10 if args.dims is None else args.dims
    model = trained.model
    device = model_device(model)
    if args.image:
        x = load_photos([args.image], trained)
        center = inference.posterior_mean_std(model, x)[0][0]
        around = f"the posterior mean of {args.image}"
    else:
        center = torch.zeros(model.latent_shape, device=device)
        around = "z = 0"
    dims, which = inference.most_active_dims(trained.checkpoint, model.latent_size, args.dims)
    check_grid(args, trained, len(dims) * args.steps)
    images = inference.traverse(model, center, args.range, args.steps, dims)
    path = inference.save_grid(images, args.out, args.steps, args.scale)
    report_grid(path, len(images), args.steps, f"a row per latent dimension, {which}: dimension "
                f"{', '.join(map(str, dims[:12]))}{', ...' if len(dims) > 12 else ''}, each from -{args.range:g} to "
                f"+{args.range:g} around {around}")


def traverse_code(args, trained):
    kind = trained.sampler(KindPrior.name)
    value_range = WALK_RANGE if args.range is None else args.range
    size = kind.state["code_size"]
    rows = min(8, size) if args.dims is None else size if args.dims == 0 else min(args.dims, size)
    check_grid(args, trained, rows * args.steps)
    if args.image:
        code = inference.kind_codes(trained.model, kind, load_photos([args.image], trained))
        around = f"the code of {args.image}"
    else:
        code = kind.typical_code()
        around = "the training photos' commonest code"
    images = inference.walk_code(trained.model, kind, code, value_range, args.steps, rows, generator_for(args))
    path = inference.save_grid(images, args.out, args.steps, args.scale)
    report_grid(path, len(images), args.steps, f"a row per principal direction of the code of the flower's kind "
                f"(the {rows} of largest spread first), each from -{value_range:g} to +{value_range:g} spreads around "
                f"{around}; the rest of every image drawn from the same noise")


def run_evaluate(args, trained):
    model, checkpoint = trained.model, trained.checkpoint
    if args.variations == 1:
        raise UserError("--variations 1 cannot show how variations differ from each other; pass 2 or more (or 0)")
    check_fid_sizes(args.fid_samples)
    images, names, described = split_images(args, trained)
    check_fid_sizes(args.fid_samples, len(images))
    print(f"evaluating {args.checkpoint} (epoch {checkpoint.get('epoch')}, step {checkpoint.get('step')}) on "
          f"{len(images)} images: {described}")
    batches = ImageBatches(images, args.batch_size, model_device(model), shuffle=False)
    results = evaluation.evaluate(model, batches, iw_samples=args.iw_samples, generator=generator_for(args),
                                  progress=True)
    results = {"checkpoint": str(args.checkpoint), "epoch": checkpoint.get("epoch"), "step": checkpoint.get("step"),
               "data": described, "seed": args.seed, **results}
    if args.variations:
        mode = inference.variation_mode(trained.samplers, args.mode, args.checkpoint)
        training, training_names, _ = training_images(args, trained)
        data_dir = data_dir_of(args, trained)
        judge = evaluation.VariationJudge(model, images, flower_classes(data_dir, names), training,
                                          flower_classes(data_dir, training_names))
        results.update(judge.judge(trained.samplers, args.variations, args.strength, mode, generator_for(args)))
    if args.fid_samples:
        sampler = trained.sampler(chosen_sampler(args, trained))
        results.update(sampler=args.sampler, temperature=args.temperature, **evaluation.sample_quality(
            model, sampler, images, args.fid_samples, args.temperature, generator_for(args), model_device(model)))
    print(format_table(results))
    if args.json:
        try:
            write_text_atomically(args.json, json.dumps(results, indent=2) + "\n")
        except OSError as error:
            raise UserError(f"{write_failure(error, args.json)}; nothing was written there. Free some disk space, "
                            f"or pass another --json path") from None
        print(f"wrote {args.json}")
    return results


KL_DIMS_SHOWN = 32  # of a spatial latent's hundreds; the JSON has them all


def format_table(results):
    """The headline numbers as a fixed-width table (nats per image unless a unit says otherwise)."""
    def number(value, digits=2):
        return "n/a" if value is None else f"{value:.{digits}f}"

    bpd = results["bits_per_dim"]
    rows = [
        ("-ELBO (beta = 1)", f"{number(results['neg_elbo_nats'])} nats"),
        ("  reconstruction -log p(x|z)", f"{number(results['reconstruction_nats'])} nats"),
        ("  KL(q(z|x) || p(z))", f"{number(results['kl_nats'])} nats"),
        (f"IWAE NLL (K = {results['iw_samples']})",
         f"{number(results['iwae_nll_nats'])} +- {number(results['iwae_nll_stderr'])} nats"),
        ("bits/dim (discretized, IWAE)",
         "n/a" if bpd is None else f"{number(bpd, 4)} +- {number(results['bits_per_dim_stderr'], 4)}"),
        ("PSNR (posterior mean)", f"{number(results['psnr_db'])} dB"),
        ("active units", f"{results['active_units']} / {results['latent_size']}"),
        ("KL per dimension", " ".join(f"{v:.2f}" for v in results["kl_per_dim"][:KL_DIMS_SHOWN])
         + (" ..." if len(results["kl_per_dim"]) > KL_DIMS_SHOWN else "") + " nats"),
    ]
    if "variation_rmse_to_input" in results:
        what = f"{results['variations']} {results['variation_mode']} variations (strength " \
               f"{results['variation_strength']:g})"
        rows += [
            (f"{what}: species kept", f"{number(results['species_kept'])} (real photos: "
             f"{number(results['species_accuracy_real'])}, reconstructions: "
             f"{number(results['species_kept_reconstructions'])})"),
            ("  diversity", f"{number(results['variation_diversity'])} (1: as varied as two photos of one "
             f"species, over {results['same_species_pairs']} such pairs)"),
            ("  FID", f"{number(results['variation_fid'])} against the {results['variation_fid_reference_images']} "
             f"photos (their reconstructions: {number(results['variation_reconstruction_fid'])})"),
            ("  RMSE (0-255)", f"{number(results['variation_rmse_to_input'])} to their photo, "
             f"{number(results['variation_rmse_to_nearest_training'])} to the nearest training image "
             f"(the photo itself: {number(results['input_rmse_to_nearest_training'])})")]
    if "fid" in results:
        rows.append((f"FID / KID ({results['fid_samples']} {results['sampler']} samples)",
                     f"{number(results['fid'])} / {number(results['kid'], 4)} +- {number(results['kid_stderr'], 4)}"
                     f" against {results['fid_reference_images']} images; reconstructions' FID "
                     f"{number(results['recon_fid'])}"))
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    if bpd is None:
        lines.append(f"note: {results['bits_per_dim_note']}")
    return "\n".join(lines)


def run_projector(args, trained):
    model, checkpoint = trained.model, trained.checkpoint
    images, names, described = split_images(args, trained)
    labels = class_labels(data_dir_of(args, trained), names)
    created = not Path(args.log_dir).exists()
    with writer_thread_errors() as failures:
        try:
            with SummaryWriter(args.log_dir) as writer:
                log_projector(writer, model, images, labels, checkpoint.get("step") or 0)
        except OSError as error:
            failures.insert(0, error)
    if failures:
        if created:  # nothing half-written is left behind
            shutil.rmtree(args.log_dir, ignore_errors=True)
        raise UserError(f"{write_failure(failures[0], args.log_dir)}; nothing was kept there. Free some disk space, "
                        f"or pass another --log-dir")
    print(f"wrote the posterior means, thumbnails and classes of {len(images)} images ({described}) to "
          f"{args.log_dir}; see them with: tensorboard --logdir {args.log_dir} (PROJECTOR tab)")


def run_export(args, trained):
    checkpoint = trained.checkpoint
    if args.fit_samplers is not None:
        kinds = args.fit_samplers or fitted_samplers()
        images, names, described = training_images(args, trained)
        check_enough_images(kinds, len(images), "fit it on a --data-dir with more photos")
        print(f"fitting the {', '.join(kinds)} sampler(s) to the posteriors of the {described}")
        started = time.perf_counter()
        options = {"diffusion": {"steps": args.diffusion_steps},
                   "kind": {"steps": args.kind_steps, "code_noise": args.kind_code_noise}}
        fitted = fit_samplers(trained.model, images, kinds, seed=args.seed, hflip=trained.config.hflip,
                              options=options, progress=True,
                              classes=flower_classes(data_dir_of(args, trained), names))
        print(f"fitted in {(time.perf_counter() - started) / 60:.1f} minutes")
        checkpoint = {**checkpoint, "samplers": {**(checkpoint.get("samplers") or {}), **fitted}}
        for name in kinds:  # the config says how each sampler it holds was fitted, as a training run's does
            checkpoint["config"] = {**checkpoint["config"], **SAMPLERS[name].config_of(options.get(name, {}))}
    stored = checkpoint.get("samplers") or {}
    if args.drop_samplers:
        missing = sorted(set(args.drop_samplers) - set(stored))
        if missing:
            raise UserError(f"--drop-samplers {' '.join(missing)}: {args.checkpoint} holds no such sampler; it holds "
                            f"{', '.join(stored) or 'none'}")
        checkpoint = {**checkpoint, "samplers": {name: state for name, state in stored.items()
                                                 if name not in args.drop_samplers}}
    export_for_inference(checkpoint, args.out)
    size = Path(args.out).stat().st_size / 1e6
    print(f"wrote {args.out} ({size:.1f} MB): the weights inference uses, the config and the run's evaluation")


def output_files(args):
    """(flag, path) of every file this command is asked to write, with the folder ones (--out-dir, --log-dir)."""
    outputs = [(flag, getattr(args, name, None)) for flag, name in (("--out", "out"), ("--json", "json"))]
    stems = [Path(image).stem for image in getattr(args, "images", None) or []]
    if getattr(args, "out_dir", None):
        if args.command == "sample":
            outputs += [("--out-dir", Path(args.out_dir) / f"sample_{i:03d}.png") for i in range(args.num)]
        else:
            outputs += [("--out-dir", Path(args.out_dir) / f"{stem}-{k}.png") for stem in stems
                        for k in range(1, args.num + 1)]
    return [(flag, Path(path)) for flag, path in outputs if path]


def check_outputs(args):
    """Refuse, before any work, to write over a file the command reads (the checkpoint, the photos), among the
    data set's images (of --data-dir here; of the checkpoint's data once it is loaded) or into a training run's
    folder; and an output that is a folder."""
    inputs = [("--checkpoint", Path(args.checkpoint))]
    inputs += [("--images", Path(image)) for image in getattr(args, "images", None) or []]
    inputs += [(flag, Path(getattr(args, name))) for flag, name in (("--image", "image"), ("--like", "like"))
               if getattr(args, name, None)]
    for out_flag, out in output_files(args):
        if out.is_dir():
            raise UserError(f"{out_flag} {out} is a folder; pass a file name inside it, e.g. {out / 'out.png'}")
        for in_flag, source in inputs:
            if source.exists() and out.exists() and out.samefile(source) or out.resolve() == source.resolve():
                raise UserError(f"{out_flag} {out} is the {in_flag} file this command reads; writing it would "
                                f"destroy it: pass another {out_flag}")
        folder = run_folder_of(out)
        if folder is not None:
            raise UserError(f"{out_flag} {out} is inside the training run folder {folder}: it could replace the "
                            f"run's checkpoints or records; write it elsewhere, e.g. {Path('outputs') / out.name}")
    check_outside_data(args, getattr(args, "data_dir", None))
    out_dir = getattr(args, "out_dir", None)
    if out_dir and Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise UserError(f"--out-dir {out_dir} is a file, not a folder; pass a folder for the single images")
    log_dir = getattr(args, "log_dir", None)
    if log_dir and any((Path(log_dir) / name).exists() for name in ("checkpoint.pt", "run.json")):
        raise UserError(f"--log-dir {log_dir} is a training run's folder; writing the projector there would replace "
                        f"the run's own: pass a new folder, e.g. --log-dir {Path(log_dir) / 'projector'}")


def run_folder_of(path):
    """The training run folder that `path` would be written into (one holding run.json or a checkpoint), or None."""
    parent = Path(path).resolve().parent
    return parent if any((parent / name).is_file() for name in ("run.json", "checkpoint.pt", "best.pt")) else None


def check_outside_data(args, data_dir):
    """Refuse an output among the images of data_dir: the one typed with --data-dir, and the one the checkpoint
    trained on, which commands read when --data-dir is not given."""
    if not data_dir or not Path(data_dir).is_dir():
        return
    for out_flag, out in output_files(args) + ([("--log-dir", Path(args.log_dir))]
                                               if getattr(args, "log_dir", None) else []):
        if inside_images_folder(data_dir, out):
            raise UserError(f"{out_flag} {out} is inside {images_folder(data_dir)}, which holds the data set's "
                            f"images: the file would replace one, or be read as a photo by the next run; "
                            f"write it outside the data set")


def choose_cpu_threads(requested, model):
    """--threads, or the faster of 1 thread and all cores at decoding a batch; said first on stdout (stderr stays
    for errors)."""
    z = torch.randn(64, *model.latent_shape, generator=torch.Generator().manual_seed(0))

    def work():
        with torch.no_grad():
            model.decode(z)
    count, timings = choose_threads(work, requested)
    print(describe(count, timings, unit_count=len(z), unit="decoded images"))


def how_to_fix(error, args):
    """What the script adds to a library error: the command that fixes it."""
    if isinstance(error, MissingData) and args.command in ("reconstruct", "evaluate", "projector"):
        return ("; without the data set, reconstruct --images PHOTO ... and variations --images PHOTO ... work on "
                "your own photos")
    if isinstance(error, MissingSampler):
        instead = {"variations": "pick --mode posterior", "evaluate": "pick --mode posterior",
                   "traverse": "pass --walk latent", "interpolate": "pass --walk latent",
                   "sample": "drop --like and --class"}.get(args.command)
        fallback = f", or {instead}" if instead and error.name in inference.variation_modes() else ""
        return (f"; fit it with python vae_inference.py export --checkpoint {args.checkpoint} --fit-samplers "
                f"{error.name} --data-dir DIR --out NEW.pt{fallback}")
    return ""


COMMANDS = {"sample": run_sample, "reconstruct": run_reconstruct, "variations": run_variations,
            "interpolate": run_interpolate, "traverse": run_traverse, "evaluate": run_evaluate,
            "projector": run_projector, "export": run_export}


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("reconstruct", "variations") and args.images:
            args.images = expand_folders(args.images)
        check_ranges(args)
        check_outputs(args)
        device = pick_device(args.device)
        trained = load_model(args.checkpoint, device)
        check_outside_data(args, trained.config.data_dir)  # the checkpoint's data, read without --data-dir
        if device.type == "cpu":
            choose_cpu_threads(args.threads, trained.model)
        if getattr(args, "scale", 0) is None:
            args.scale = inference.readable_scale(trained.model.image_resolution)
        COMMANDS[args.command](args, trained)
        return 0
    except UserError as error:
        if args.debug:
            raise
        print(f"error: {error}{how_to_fix(error, args)}", file=sys.stderr)
        return 2
    except OSError as error:  # a write the command's own checks could not foresee: a full disk, a folder gone
        if args.debug:
            raise
        print(f"error: {write_failure(error)}; nothing was written there. Free some disk space, or pass another "
              f"output path", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; nothing was written after the last message", file=sys.stderr)
        return 130


if __name__ == "__main__":
    vae.quiet_start.loaded()
    sys.exit(main())
