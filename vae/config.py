"""One dataclass holds a training run's settings; argparse is built from it and it is saved in checkpoints."""

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from vae.losses import LIKELIHOODS, SEED_SIGMA
from vae.schedules import SCHEDULES

SPLITS = ("train", "val", "test")


def _flag(default, help, **argparse_kwargs):
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass
class TrainConfig:
    # Data
    data_dir: str = _flag("datasets", "Flowers102 root in torchvision's layout; the data set is downloaded "
                          "into DATA_DIR/flowers-102 when absent")
    split: str = _flag("train", "split to train on", choices=SPLITS)
    eval_split: str = _flag("test", "split evaluated every epoch ('none' to skip)", choices=SPLITS + ("none",))
    holdout: float = _flag(0.0, "fraction of the training split held out (seeded) and evaluated instead of "
                           "--eval-split; for data with a train split only")
    eval_size: int = _flag(512, "images of the evaluation set used every epoch (a fixed subset; 0 = all)")
    resolution: int = _flag(32, "images are resized to RESOLUTION x RESOLUTION (a multiple of 8)")
    cache_dir: str = _flag("", "where the decoded-image cache goes when DATA_DIR is not writable "
                           "(empty: ~/.cache/vae-flowers)")
    skip_bad_images: bool = _flag(False, "skip (and count) images that cannot be decoded instead of stopping")
    num_workers: int = _flag(min(8, os.cpu_count() or 1), "processes decoding JPEGs while the image cache is built")
    # Model
    latent_size: int = _flag(10, "dimensions of the latent code z")
    channels: list = _flag(None, "channels of each down-sampling stage (default: 16 32 64 at 32x32, one more "
                           "doubling stage per doubling of the resolution)", nargs="+", type=int)
    batch_norm: bool = _flag(False, "BatchNorm after each convolution of the encoder and decoder")
    # Objective and optimisation
    likelihood: str = _flag("gaussian", "decoder likelihood p(x|z): gaussian (fixed sigma; sigma 1/sqrt(2) makes "
                            "the loss the seed's sum of squared error), gaussian-learned (one shared learned "
                            "sigma), bernoulli (summed binary cross-entropy)",
                            choices=LIKELIHOODS)
    sigma: float = _flag(SEED_SIGMA, "sigma of the gaussian likelihood (initial sigma for gaussian-learned)")
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
    sigma_lr: float = _flag(1e-2, "Adam learning rate of the learned log sigma (gaussian-learned): Adam moves a "
                            "parameter by about its rate per step, so at --lr this one scalar would need "
                            "thousands of steps to reach the error scale")
    batch_size: int = _flag(64, "images per optimisation step, in total: under torchrun each of N processes "
                            "takes BATCH_SIZE / N")
    epochs: int = _flag(500, "total number of epochs (a resumed run continues up to this)")
    max_steps: int = _flag(0, "stop after this many optimisation steps in total (0 = no limit; for smoke runs)")
    seed: int = _flag(0, "seed for initialisation, shuffling, hold-out and noise")
    amp: bool = _flag(False, "bf16 autocast for the model on CUDA (the loss stays float32)")
    compile: bool = _flag(False, "torch.compile the model (a one-off compilation, then faster steps)")
    device: str = _flag("auto", "where to train (auto: cuda, then mps, then cpu)",
                        choices=("auto", "cpu", "cuda", "mps"))
    # Output
    log_dir: str = _flag("runs", "each run writes LOG_DIR/RUN_NAME/ (TensorBoard events, checkpoints)")
    run_name: str = _flag("", "name of the run folder (default: date and time)")
    checkpoint_every: float = _flag(10.0, "also save checkpoint.pt every this many minutes within an epoch "
                                    "(0 = only at the end of each epoch)")
    grid_size: int = _flag(32, "images in each TensorBoard grid (originals, reconstructions, samples)")


def build_parser(config_class=TrainConfig, **parser_kwargs) -> argparse.ArgumentParser:
    """An argparse parser with one kebab-case flag per dataclass field, its default shown in --help."""
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter, **parser_kwargs)
    for f in dataclasses.fields(config_class):
        kwargs = dict(f.metadata)
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif "type" not in kwargs:
            kwargs["type"] = f.type
        parser.add_argument(flag, default=f.default, **kwargs)
    return parser


def config_from_args(args: argparse.Namespace, config_class=TrainConfig):
    names = {f.name for f in dataclasses.fields(config_class)}
    return config_class(**{k: v for k, v in vars(args).items() if k in names})


def default_channels(resolution: int) -> list:
    """16, 32, 64 at 32x32; one more doubling stage each time the feature map would stay at least 4x4."""
    stages = 3
    while resolution % 2 ** (stages + 1) == 0 and resolution // 2 ** (stages + 1) >= 4:
        stages += 1
    return [16 * 2**i for i in range(stages)]


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
        flag = "--" + name.replace("_", "-")
        if name not in fields:
            parser.error(f"--config {path} has an unknown setting {key!r} (see --help for the flags)")
        if fields[name].type is bool:
            if not isinstance(value, bool):
                parser.error(f"--config {path}: {key} must be true or false, not {value!r}")
            arguments.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list) != (fields[name].type is list) or isinstance(value, (dict, bool)):
            parser.error(f"--config {path}: {key} = {value!r} does not fit {flag}")
        else:
            arguments += [flag, *map(str, value if isinstance(value, list) else [value])]
    return arguments
