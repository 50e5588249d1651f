"""VAE: the model the scripts import."""

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from vae.config import default_channels
from vae.layers import Decoder, Encoder, ResNetDecoder, ResNetEncoder, SampleLatent
from vae.losses import LIKELIHOODS, SEED_SIGMA

ARCHITECTURES = ("seed", "resnet")

# Floor on the learned log sigma (sigma ~ 0.0025), as sigma-VAE's soft clip does: below it the Gaussian
# density of 8-bit pixels is no longer a meaningful model of the data.
MIN_LOG_SIGMA = -6.0


class VAE(nn.Module):
    """Encoder -> SampleLatent -> Decoder. forward(x) returns (reconstruction, mean, log_var).

    With the defaults (32x32 RGB, latent 10, channels 16/32/64) this is the seed's model, 65,831 parameters.
    arch="resnet" swaps in ResNetEncoder/ResNetDecoder of base `width` channels; with it, latent_shape (C, H, W)
    gives a spatial latent instead of the dense one of latent_size. Either way `latent_shape` is the shape of
    one image's z and `latent_size` its number of dimensions.
    """

    def __init__(self, image_resolution=(32, 32), latent_size=10, image_channels=3, channels=None,
                 batch_norm=False, likelihood="gaussian", sigma=SEED_SIGMA, arch="seed", width=64,
                 latent_shape=None):
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {likelihood!r}; use one of {', '.join(LIKELIHOODS)}")
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown arch {arch!r}; use one of {', '.join(ARCHITECTURES)}")
        if latent_shape:
            latent_shape = tuple(latent_shape)
            if len(latent_shape) != 3 or min(latent_shape) < 1:
                raise ValueError(f"latent shape must be C H W, three positive sizes, got {latent_shape}")
        elif latent_size < 1:
            raise ValueError(f"latent size must be at least 1, got {latent_size}")
        else:
            latent_shape = (latent_size,)
        if arch == "seed" and len(latent_shape) == 3:
            raise ValueError(f"a spatial latent shape {latent_shape} needs --arch resnet; the seed architecture "
                             f"has a dense latent (--latent-size)")
        if arch == "resnet" and (channels or batch_norm):
            raise ValueError("--channels and --batch-norm belong to --arch seed; the resnet's channels come from "
                             "--width, and it has no normalisation layers")
        self.likelihood = likelihood
        self.sigma = sigma
        self.arch = arch
        if likelihood == "gaussian-learned":
            # The inverse of log_sigma()'s soft floor, so training starts at exactly `sigma`.
            start = math.log(sigma) - MIN_LOG_SIGMA
            self.raw_log_sigma = nn.Parameter(torch.tensor(MIN_LOG_SIGMA + start + math.log(-math.expm1(-start))))
        if isinstance(image_resolution, int):  # VAE(32) means 32x32
            image_resolution = (image_resolution, image_resolution)
        self.image_resolution = tuple(image_resolution)
        self.image_channels = image_channels
        self.latent_shape = latent_shape
        self.latent_size = math.prod(latent_shape)
        log_scale = likelihood == "logistic"  # the decoder also predicts a log scale per pixel
        if arch == "resnet":
            self.encoder = ResNetEncoder(self.image_resolution, image_channels, latent_shape, width)
            self.decoder = ResNetDecoder(self.image_resolution, image_channels, latent_shape, width, log_scale)
        else:
            channels = list(channels) if channels else default_channels(min(self.image_resolution))
            self.encoder = Encoder(self.image_resolution, image_channels, latent_size, channels, batch_norm)
            self.decoder = Decoder(self.image_resolution, image_channels, latent_size, channels, batch_norm,
                                   log_scale)
        self.sample_latent = SampleLatent(self.latent_size)

    def forward(self, x, return_log_scale=False):
        """(reconstruction, mean, log_var); with return_log_scale=True also the decoder's log scale for the
        same z (see decode_distribution), which the loss needs for the logistic likelihood."""
        mean, log_var = self.encoder(x)
        reconstruction, log_scale = self.decode_distribution(self.sample_latent(mean, log_var))
        if return_log_scale:
            return reconstruction, mean, log_var, log_scale
        return reconstruction, mean, log_var

    def log_sigma(self):
        """log sigma of the Gaussian decoder (a floored parameter when learned); None for the logistic, whose
        scale is per pixel (see decode_distribution), and for the Bernoulli."""
        if self.likelihood == "gaussian-learned":
            return MIN_LOG_SIGMA + F.softplus(self.raw_log_sigma - MIN_LOG_SIGMA)
        if self.likelihood == "gaussian":
            return torch.tensor(math.log(self.sigma), device=next(self.parameters()).device)
        return None

    def encode(self, x):
        """x (batch, C, H, W) in [0, 1] -> (mean, log_var) of q(z|x), each (batch, *latent_shape)."""
        return self.encoder(x)

    def decode(self, z):
        """z (batch, *latent_shape) -> image (batch, C, H, W) in [0, 1]: the likelihood's mean (Gaussian,
        logistic) or probability (Bernoulli)."""
        return self.decode_distribution(z)[0]

    def decode_distribution(self, z):
        """z -> (image, log_scale), the parameters of p(x|z): log_scale is log sigma as a 0-dim tensor for the
        Gaussians, the per-pixel log scale (batch, C, H, W) for the logistic, None for the Bernoulli."""
        if self.likelihood == "logistic":
            return self.decoder(z)
        return self.decoder(z), self.log_sigma()


@contextlib.contextmanager
def eval_mode(model):
    """The model in eval mode (BatchNorm on its running statistics) inside the block, and back in the mode it
    was in afterwards, whatever happens inside."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def build_model(config) -> VAE:
    """The VAE a TrainConfig (or its saved dict) describes. Settings newer than a checkpoint take the seed's
    values, so old checkpoints build the model they were trained with."""
    def get(name, default):
        return config.get(name, default) if isinstance(config, dict) else getattr(config, name, default)

    resolution = get("resolution", 32)
    return VAE((resolution, resolution), latent_size=get("latent_size", 10), channels=get("channels", None),
               batch_norm=get("batch_norm", False), likelihood=get("likelihood", "gaussian"),
               sigma=get("sigma", SEED_SIGMA), arch=get("arch", "seed"), width=get("width", 64),
               latent_shape=get("latent_shape", None))
