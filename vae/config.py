"""A training run's settings: one dataclass, the argparse parser built from it, its checks, and the rules for
which settings a resumed run may change. The dataclass is saved (as a dict) in every checkpoint."""

import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from datasets.decoding import RESIZES
from vae.device import DEVICES
from vae.errors import UserError
from vae.fid import inception_path
from vae.kind_prior import CODE_NOISE
from vae.layers import ARCHITECTURES
from vae.likelihoods import LIKELIHOODS, TUTORIAL_SIGMA
from vae.schedules import SCHEDULES
from vae.vae import build_model

SPLITS = ("train", "val", "test")

# The allowed values (inclusive) of every numeric flag of vae_training.py and vae_inference.py, by setting name:
# check_ranges refuses anything outside, NaN included, with one line naming the flag. The page narrows a few of
# them for a public server (vae_demo.PAGE_LIMITS) and checks them with the same check_range.
RANGES = {
    # both scripts
    "seed": (0, 2 ** 32 - 1), "threads": (0, 1024), "batch_size": (1, 100_000), "fid_samples": (0, 100_000),
    "holdout": (0.0, 0.999),
    # training
    "diffusion_prior_steps": (0, 1_000_000), "kind_prior_steps": (0, 1_000_000), "kind_code_noise": (0.0, 100.0),
    # inference
    "num": (1, 10_000), "nrow": (1, 10_000), "steps": (1, 1_000), "scale": (1, 64), "dims": (0, 100_000),
    "class_": (1, 100_000),  # sample --class (class_: "class" is Python's)
    "temperature": (0.0, 100.0), "range": (0.0, 100.0), "holdout_seed": (0, 2 ** 32 - 1),
    "iw_samples": (1, 100_000), "variations": (0, 1_000), "strength": (0.0, 1.0), "diffusion_steps": (1, 1_000_000),
    "kind_steps": (1, 1_000_000),
}
# Settings that may change when a run is resumed: where it runs, how long, and speed-only switches. Any other
# difference would silently make it another run.
RESUMABLE = {"epochs", "max_steps", "log_dir", "run_name", "num_workers", "device", "checkpoint_every", "data_dir",
             "cache_dir", "amp", "compile", "fid_samples", "diffusion_prior_steps", "kind_prior_steps",
             "kind_code_noise", "threads"}


def _flag(default, help, **argparse_kwargs):
    """A config field and its flag: help is text, or a function giving it when the parser is built."""
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass
class TrainConfig:
    # Data
    data_dir: str = _flag("datasets", "Flowers102 root in torchvision's layout (downloaded into DATA_DIR/flowers-102 "
                          "when absent), or any folder of images, flat or one sub-folder per class")
    split: str = _flag("train", "Flowers102 split(s) to train on; join several with + (train+val). A folder of "
                       "images has one split, all of it")
    eval_split: str = _flag("test", "split evaluated every epoch ('none' to skip)", choices=SPLITS + ("none",))
    holdout: float = _flag(0.0, "fraction of the training split held out (seeded) and evaluated instead of "
                           "--eval-split; for data with a train split only")
    eval_size: int = _flag(512, "images of the evaluation set used every epoch (a fixed subset; 0 = all)")
    resolution: int = _flag(32, "images are resized to RESOLUTION x RESOLUTION (a multiple of 8)")
    resize: str = _flag("squash", "how a photo becomes a square: squash (the tutorial's: the whole photo, its aspect "
                        "lost) or center-crop (the largest centred square); inference uses the checkpoint's",
                        choices=RESIZES)
    cache_dir: str = _flag("", "where the decoded-image cache goes when DATA_DIR is not writable "
                           "(empty: ~/.cache/vae-flowers)")
    skip_bad_images: bool = _flag(False, "skip (and count) images that cannot be decoded instead of stopping")
    num_workers: int = _flag(min(8, os.cpu_count() or 1), "processes decoding JPEGs while the image cache is built "
                             "(0 or 1: in this process)")
    hflip: bool = _flag(False, "flip each training image horizontally with probability 1/2 (seeded per epoch)")
    # Model
    # The registries themselves, read when the parser is built, so an architecture or likelihood registered later is
    # a choice too.
    arch: str = _flag("seed", lambda: "encoder and decoder: " + "; ".join(
        f"{name}: {architecture.help}" for name, architecture in ARCHITECTURES.items()), choices=ARCHITECTURES)
    width: int = _flag(64, "channels of the first resnet stage (doubled once, at the second stage)")
    latent_size: int = _flag(10, "dimensions of the dense latent code z")
    latent_shape: list = _flag(None, "a spatial latent of C x H x W instead of --latent-size (resnet only)",
                               nargs=3, type=int, metavar=("C", "H", "W"))
    channels: list = _flag(None, "channels of each down-sampling stage (default: 16 32 64 at 32x32, one more "
                           "doubling stage per doubling of the resolution)", nargs="+", type=int)
    batch_norm: bool = _flag(False, "BatchNorm after each convolution of the encoder and decoder")
    space_to_depth: bool = _flag(False, "resnet: a pixel-unshuffle stem and a pixel-shuffle output, so that no "
                                 "convolution runs at the image's full resolution")
    stage_channels: list = _flag(None, "resnet: channels of each resolution stage, finest first (default: --width, "
                                 "then 2 x --width)", nargs="+", type=int)
    stage_blocks: list = _flag(None, "resnet: residual blocks of each resolution stage, finest first (default: 1 "
                               "each)", nargs="+", type=int)
    # Objective and optimisation
    likelihood: str = _flag("gaussian", lambda: "decoder likelihood p(x|z): " + "; ".join(
        f"{name}: {cls.help}" for name, cls in LIKELIHOODS.items()), choices=LIKELIHOODS)
    sigma: float = _flag(TUTORIAL_SIGMA, "sigma of the gaussian likelihood (initial sigma for gaussian-learned)")
    beta: float = _flag(0.1, "weight of the KL term: loss = beta * KL + reconstruction (the top weight of a "
                        "KL schedule); with --likelihood gaussian-learned it defaults to 1, the ELBO itself")
    kl_schedule: str = _flag("constant", "how the KL weight moves from 0 to --beta: constant, linear or sigmoid "
                             "warm-up, or cyclical (Fu et al. 2019)",
                             choices=SCHEDULES)
    kl_warmup_epochs: float = _flag(10.0, "epochs the linear/sigmoid warm-up takes to reach --beta")
    kl_cycles: int = _flag(4, "number of cycles of the cyclical schedule over the run")
    kl_ratio: float = _flag(0.5, "fraction of each cycle spent rising from 0 to --beta (the rest stays at --beta)")
    free_bits: float = _flag(0.0, "per-dimension floor (nats) on the batch-mean KL in the loss (Kingma et al. 2016)")
    lr: float = _flag(1e-4, "Adam learning rate")
    lr_schedule: str = _flag("constant", "learning rate after the warm-up: constant, or cosine decay to 0 at the "
                             "last epoch", choices=("constant", "cosine"))
    lr_warmup_epochs: float = _flag(0.0, "epochs of linear learning-rate warm-up from 0")
    grad_clip: float = _flag(0.0, "clip the global gradient norm to this (0 = off)")
    ema: float = _flag(0.0, "decay of an exponential moving average of the weights (e.g. 0.999; 0 = off): "
                       "evaluation, grids, best.pt and inference use the averaged weights")
    sigma_lr: float = _flag(1e-2, "Adam learning rate of the learned log sigma (gaussian-learned): Adam moves a "
                            "parameter by about its rate per step, so at --lr this one scalar would need "
                            "thousands of steps to reach the error scale")
    batch_size: int = _flag(64, "images per optimisation step, in total: under torchrun each of N processes "
                            "takes BATCH_SIZE / N")
    epochs: int = _flag(500, "total number of epochs (a resumed run continues up to this)")
    max_steps: int = _flag(0, "stop after this many optimisation steps in total (0 = no limit; for smoke runs)")
    seed: int = _flag(0, "seed for initialisation, shuffling, hold-out and noise")
    amp: bool = _flag(False, "bf16 autocast for the model on CUDA and on CPUs with bf16 support (the loss "
                      "stays float32)")
    compile: bool = _flag(False, "torch.compile the model (a one-off compilation, then faster steps)")
    device: str = _flag("auto", "where to train (auto: cuda, then mps, then cpu)",
                        choices=DEVICES)
    threads: int = _flag(0, "CPU threads torch uses (0: timed at the start, 1 against all cores, the faster kept: "
                         "on busy cores one thread can be several times faster)")
    # Output
    log_dir: str = _flag("runs", "each run writes LOG_DIR/RUN_NAME/ (TensorBoard events, checkpoints)")
    run_name: str = _flag("", "name of the run folder (default: date and time)")
    checkpoint_every: float = _flag(10.0, "also save checkpoint.pt every this many minutes within an epoch "
                                    "(0 = only at the end of each epoch)")
    grid_size: int = _flag(32, "images in each TensorBoard grid (originals, reconstructions, samples)")
    fid_samples: int = _flag(0, "at the end, FID and KID of this many samples (from the best sampler fitted then) "
                             "against the evaluation images, into HPARAMS (0 = off; needs requirements-metrics.txt)")
    diffusion_prior_steps: int = _flag(0, "at the end, also fit the diffusion prior (new flowers, and variations "
                                       "of a photo) for this many steps, beside the GMM (0 = off; docs/results.md "
                                       "has its sample FID against fitting minutes)")
    kind_prior_steps: int = _flag(0, "at the end, also fit the kind sampler for this many steps (0: as many as "
                                  "--diffusion-prior-steps, if any; docs/kind.md: its variations keep the species "
                                  "more often after 12,000)")
    kind_code_noise: float = _flag(CODE_NOISE, "standard deviation added to each number of the kind sampler's code "
                                   "while it is fitted and in variations, so that the code holds a kind, not a "
                                   "photo (0: none; docs/kind.md)")


def build_parser(config_class=TrainConfig, **parser_kwargs) -> argparse.ArgumentParser:
    """An argparse parser with one kebab-case flag per dataclass field, its default shown in --help."""
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter, **parser_kwargs)
    for f in dataclasses.fields(config_class):
        kwargs = dict(f.metadata)
        if callable(kwargs["help"]):
            kwargs["help"] = kwargs["help"]()
        flag = flag_name(f.name)
        if f.type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif "type" not in kwargs:
            kwargs["type"] = f.type
        parser.add_argument(flag, default=f.default, **kwargs)
    return parser


def config_from_args(args: argparse.Namespace, config_class=TrainConfig):
    names = {f.name for f in dataclasses.fields(config_class)}
    return config_class(**{k: v for k, v in vars(args).items() if k in names})


def config_file_arguments(parser, path, config_class=TrainConfig):
    """A JSON file of settings ({"likelihood": "gaussian-learned", "batch-norm": true, ...}) as command-line
    arguments, so the parser checks their types and choices exactly as it checks flags; [] without a file."""
    if not path:
        return []
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        parser.error(f"cannot read --config {path}: {error}")
    if not isinstance(values, dict):
        parser.error(f"--config {path} must hold a JSON object of settings")
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    arguments = []
    for key, value in values.items():
        name = key.replace("-", "_")
        flag = flag_name(name)
        if name not in fields:
            parser.error(f"--config {path} has an unknown setting {key!r} (see --help for the flags)")
        if value is None:  # null: the flag's default, as if the setting were left out
            continue
        if fields[name].type is bool:
            if not isinstance(value, bool):
                parser.error(f"--config {path}: {key} must be true or false, not {value!r}")
            arguments.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list) != (fields[name].type is list) or isinstance(value, (dict, bool)):
            parser.error(f"--config {path}: {key} = {value!r} does not fit {flag}")
        else:
            arguments += [flag, *map(str, value if isinstance(value, list) else [value])]
    return arguments


def flag_name(name):
    return "--" + name.strip("_").replace("_", "-")


def check_range(label, value, bounds):
    """value, if it is a number within bounds (inclusive); otherwise a one-line UserError naming label."""
    low, high = bounds
    if value is None:
        raise UserError(f"{label} is empty: give a number between {low} and {high}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):  # a value from a file or an API request
        raise UserError(f"{label} must be a number between {low} and {high}, not the {type(value).__name__} "
                        f"{value!r}")
    if not low <= value <= high:
        raise UserError(f"{label} must be between {low} and {high}, not {value}")
    return value


def check_fid_sizes(fid_samples, reference_images=None):
    """FID and KID compare two sets of images, each of at least two: --fid-samples 1, or fewer than two images
    to compare with, is refused before any work (KID's unbiased estimate divides by n - 1)."""
    if fid_samples == 1:
        raise UserError("--fid-samples must be 0 (no FID) or at least 2: FID and KID compare sets of images")
    if fid_samples and reference_images is not None and reference_images < 2:
        raise UserError(f"FID and KID need at least 2 evaluation images to compare the samples with, not "
                        f"{reference_images}; use a larger --eval-size or --holdout, or --fid-samples 0")


def check_ranges(settings):
    """Every setting of `settings` (a TrainConfig or parsed arguments) that RANGES names, unless it is unset."""
    for name, bounds in RANGES.items():
        value = getattr(settings, name, None)
        if value is not None:
            check_range(flag_name(name), value, bounds)


def validate_config(config):
    """Reject impossible settings before any data is read, with the flag to change: check_settings, and what
    depends on this machine (the processes torchrun started, the FID extractor)."""
    check_settings(config)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if config.batch_size % world_size:
        raise UserError(f"--batch-size {config.batch_size} (the global batch) must be divisible by the "
                        f"{world_size} processes torchrun started")
    if config.fid_samples:
        inception_path()  # now, not after hours of training: says how to install the extractor when it is absent


def check_settings(config):
    """Reject impossible settings, with the flag to change; training checks its flags with it, and every
    checkpoint read checks its saved settings with it. The model's own settings (shapes, sizes, sigma, and each
    architecture's options) are checked by building it, without allocating its weights."""
    largest = torch.finfo(torch.float32).max  # training computes in float32: --lr 1e39 overflows in Adam's step
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not (math.isfinite(value) and abs(value) <= largest):
            raise UserError(f"{flag_name(f.name)} must be a finite number no larger than float32's {largest:.3g}, "
                            f"got {value}")
    check_ranges(config)
    check_fid_sizes(config.fid_samples)
    checks = [
        (config.resolution >= 8 and config.resolution % 8 == 0,
         f"--resolution must be a positive multiple of 8, got {config.resolution}"),
        (config.beta >= 0, f"--beta must be >= 0, got {config.beta}"),
        (config.free_bits >= 0, f"--free-bits must be >= 0, got {config.free_bits}"),
        (0 < config.kl_ratio <= 1, f"--kl-ratio must be in (0, 1], got {config.kl_ratio}"),
        (config.kl_cycles >= 1, f"--kl-cycles must be at least 1, got {config.kl_cycles}"),
        (config.kl_warmup_epochs >= 0, f"--kl-warmup-epochs must be >= 0, got {config.kl_warmup_epochs}"),
        (config.sigma_lr > 0, f"--sigma-lr must be > 0, got {config.sigma_lr}"),
        (config.lr > 0, f"--lr must be > 0, got {config.lr}"),
        (config.epochs >= 1, f"--epochs must be at least 1, got {config.epochs}"),
        (config.max_steps >= 0, f"--max-steps must be >= 0, got {config.max_steps}"),
        (config.eval_size >= 0, f"--eval-size must be >= 0, got {config.eval_size}"),
        (config.grid_size >= 1, f"--grid-size must be at least 1, got {config.grid_size}"),
        (not config.run_name or ("/" not in config.run_name and "\\" not in config.run_name
                                 and config.run_name not in (".", "..")),
         f"--run-name {config.run_name!r} must be a folder name inside --log-dir, not a path; pass --log-dir for "
         f"where runs go"),
        (config.holdout == 0 or config.eval_split in ("test", "none"),
         "--holdout replaces --eval-split; pass only one of them"),
        (config.resolution <= 1024, f"--resolution {config.resolution} is far beyond what this VAE is built for; "
                                    f"use 32 or 64"),
        (config.latent_size <= 65_536, f"--latent-size {config.latent_size} is too large; use at most 65536"),
        (config.grid_size <= 1024, f"--grid-size {config.grid_size} is too large; use at most 1024"),
        (not config.latent_shape or 1 <= min(config.latent_shape) and max(config.latent_shape) <= 4096,
         f"--latent-shape sizes must be in [1, 4096], got {config.latent_shape}"),
        (all(part in SPLITS for part in config.split.split("+")),
         f"--split {config.split}: each of its +-joined parts must be one of {', '.join(SPLITS)}"),
        (0 <= config.ema < 1, f"--ema is a decay in [0, 1), e.g. 0.999, got {config.ema}"),
        (config.grad_clip >= 0, f"--grad-clip must be >= 0, got {config.grad_clip}"),
        (config.lr_warmup_epochs >= 0, f"--lr-warmup-epochs must be >= 0, got {config.lr_warmup_epochs}"),
        (config.checkpoint_every >= 0, f"--checkpoint-every must be >= 0, got {config.checkpoint_every}"),
        (config.num_workers >= 0, f"--num-workers must be 0 (decode in this process) or more, got "
                                  f"{config.num_workers}"),
        (not config.fid_samples or config.eval_split != "none" or config.holdout > 0,
         "--fid-samples compares samples with the evaluation images; pass --holdout or an --eval-split"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    try:
        with torch.device("meta"):
            build_model(config)
    except ValueError as error:
        raise UserError(str(error)) from None


def saved_config(saved, path):
    """The TrainConfig of a checkpoint's saved settings: settings newer than the checkpoint take their defaults
    (the tutorial's), so old checkpoints describe the run they were. Settings this code does not know are an
    error: the checkpoint comes from another version or model."""
    if not isinstance(saved, dict):
        raise UserError(f"{path} is damaged: its config is a {type(saved).__name__}, not the settings of a run; "
                        f"use another checkpoint")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(saved) - set(fields))
    if unknown:
        raise UserError(f"{path} has settings this code does not know ({', '.join(unknown)}); it comes from "
                        f"another version or model: start a new run, or use the code that wrote it")
    for name, value in saved.items():
        expected = _setting_type(fields[name])
        if not _has_type(value, expected):
            raise UserError(f"{path} is damaged: its setting {name} is {value!r}, not {expected}; use another "
                            f"checkpoint")
    config = TrainConfig(**saved)
    try:
        check_settings(config)
    except UserError as error:
        raise UserError(f"{path} is damaged or was edited: its settings are impossible ({error}); use another "
                        f"checkpoint") from None
    return config


# What each annotation of TrainConfig allows in a saved config (JSON's types: a float setting may be stored as an
# integer, a list setting may be unset).
_TYPES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list of integers"}


def _setting_type(f):
    return _TYPES[f.type]


def _has_type(value, expected):
    if isinstance(value, bool):
        return expected == _TYPES[bool]
    if expected == _TYPES[list]:
        return value is None or (isinstance(value, (list, tuple))
                                 and all(isinstance(v, int) and not isinstance(v, bool) for v in value))
    return isinstance(value, {"a string": str, "an integer": int, "a number": (int, float)}.get(expected, ()))


def resumed_config(saved, config, explicit, path):
    """The config a resumed run continues with: the checkpoint's settings `saved`, with the RESUMABLE flags
    the user gave explicitly. Any other explicit flag must agree with the checkpoint."""
    saved_config(saved, path)  # settings this code does not know are an error
    # Settings newer than the checkpoint take this command's values (their defaults unless given).
    resumed = TrainConfig(**{**dataclasses.asdict(config), **saved})
    for name in sorted(explicit):
        value = getattr(config, name)
        if name in RESUMABLE:
            setattr(resumed, name, value)
        elif value != saved.get(name, value):
            allowed = ", ".join(flag_name(f) for f in sorted(RESUMABLE))
            raise UserError(f"{path} was trained with {flag_name(name)} {saved[name]}, not {value}; drop "
                            f"{flag_name(name)} to resume (only {allowed} may change) or start a new run")
    return resumed
