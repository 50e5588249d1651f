"""A trained model as inference uses it: the VAE (its averaged weights when the run kept them), its settings, its
samplers of the latent space, and where its images came from, so that the images it trained on and those it
held out can be loaded again exactly.

    trained = load_model("pretrained/flowers32.pt", "cpu")
    trained.model, trained.config, trained.samplers["diffusion"], trained.data.held_out_images(data_dir)
"""

import dataclasses
from pathlib import Path

from datasets.folders import is_image_folder
from datasets.preprocessing import dataset_images
from vae.checkpoint import check_weights, load_checkpoint, restore_model
from vae.config import TrainConfig, saved_config
from vae.errors import MissingSampler
from vae.samplers import SAMPLERS, Prior, checked_sampler, ranked
from vae.vae import build_model


@dataclasses.dataclass
class TrainingData:
    """Where a run's images came from: its data folder and split, the resolution and resize they were decoded
    at, and its seeded hold-out. A data_dir given to a method replaces the run's own (data that moved)."""

    data_dir: str
    split: str
    resolution: int
    holdout: float
    seed: int
    resize: str
    cache_dir: str = ""
    skip_bad_images: bool = False

    @classmethod
    def of(cls, config):
        return cls(str(config.data_dir), config.split, config.resolution, config.holdout, config.seed, config.resize,
                   config.cache_dir, config.skip_bad_images)

    def describe(self, data_dir, split):
        """How messages name the images: a folder of images is one set, whatever the split."""
        return str(data_dir) if is_image_folder(data_dir) else f"{data_dir} split {split}"

    def _load(self, data_dir, split, subset, holdout, seed, cache_dir):
        return dataset_images(data_dir, split, self.resolution, subset=subset, holdout=holdout, holdout_seed=seed,
                              cache_dir=cache_dir or self.cache_dir, num_workers=TrainConfig.num_workers,
                              skip_bad_images=self.skip_bad_images, resize=self.resize)

    def training_images(self, data_dir=None, split=None, cache_dir=""):
        """(uint8 images, names, description) of the images the run trained on: `split` (default the run's) of
        data_dir (default the run's), its hold-out left out when it is the run's own split."""
        data_dir, split = data_dir or self.data_dir, split or self.split
        holdout = self.holdout if split == self.split else 0.0
        images, names = self._load(data_dir, split, "train", holdout, self.seed, cache_dir)
        kept_aside = f" (its {holdout:g} hold-out excluded, as in training)" if holdout else ""
        return images, names, f"{len(images)} training images of {self.describe(data_dir, split)}{kept_aside}"

    def evaluation_images(self, data_dir=None, split=None, holdout=0.0, holdout_seed=None, cache_dir="",
                          holdout_wording="held out"):
        """(uint8 images, names, description) to evaluate on: the images held out of `split` (default the run's)
        with holdout > 0 (the run's own hold-out with its fraction and seed), else the whole of `split` (default
        test). holdout_wording names that hold-out in the description."""
        data_dir = data_dir or self.data_dir
        seed = self.seed if holdout_seed is None else holdout_seed
        split = split or (self.split if holdout > 0 else "test")
        images, names = self._load(data_dir, split, "held-out", holdout, seed, cache_dir)
        described = self.describe(data_dir, split)
        if holdout > 0:
            described += f", the {len(images)} images {holdout_wording}"
        return images, names, described


@dataclasses.dataclass
class TrainedModel:
    """What a checkpoint holds for inference. samplers: {name: Sampler}, the prior and those fitted and stored
    in it; checkpoint: the plain dict itself (its eval, epoch and step)."""

    model: object
    config: TrainConfig
    samplers: dict
    data: TrainingData
    checkpoint: dict
    path: Path

    def best_sampler(self):
        """The name of the best sampler it holds (the lowest rank): a fitted one when stored, else the prior."""
        return ranked(self.samplers)[0]

    def sampler(self, name):
        """The sampler `name`, or a one-line error that says which ones it holds."""
        if name not in self.samplers:
            known = "" if name in SAMPLERS else f"; the known ones are {', '.join(SAMPLERS)}"
            raise MissingSampler(f"{self.path} has no {name} sampler (it has: {', '.join(ranked(self.samplers))})"
                                 f"{known}", name, self.path)
        return self.samplers[name]


def load_model(checkpoint_path, device):
    """The TrainedModel of a checkpoint, its model in eval mode on device. The checkpoint's config rebuilds the
    model; a run that kept a moving average of its weights is used with them."""
    checkpoint = load_checkpoint(checkpoint_path)
    config = saved_config(checkpoint["config"], checkpoint_path)
    key = "ema_model" if "ema_model" in checkpoint else "model"
    check_weights(config, checkpoint, checkpoint_path, key)
    model = restore_model(build_model(config), checkpoint, checkpoint_path, key).to(device).eval()
    samplers = {"prior": Prior.of_size(model.latent_size),
                **{name: checked_sampler(name, state, model.latent_size, checkpoint_path)
                   for name, state in (checkpoint.get("samplers") or {}).items()}}
    return TrainedModel(model, config, samplers, TrainingData.of(config), checkpoint, Path(checkpoint_path))
