"""VAE: the model the scripts import."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from vae.config import default_channels
from vae.layers import Decoder, Encoder, SampleLatent
from vae.losses import LIKELIHOODS, SEED_SIGMA

# Floor on the learned log sigma (sigma ~ 0.0025), as sigma-VAE's soft clip does: below it the Gaussian
# density of 8-bit pixels is no longer a meaningful model of the data.
MIN_LOG_SIGMA = -6.0


class VAE(nn.Module):
    """Encoder -> SampleLatent -> Decoder. forward(x) returns (reconstruction, mean, log_var).

    With the defaults (32x32 RGB, latent 10, channels 16/32/64) this is the seed's model, 65,831 parameters.
    """

    def __init__(self, image_resolution=(32, 32), latent_size=10, image_channels=3, channels=None,
                 batch_norm=False, likelihood="gaussian", sigma=SEED_SIGMA):
        super().__init__()
        if latent_size < 1:
            raise ValueError(f"latent size must be at least 1, got {latent_size}")
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {likelihood!r}; use one of {', '.join(LIKELIHOODS)}")
        self.likelihood = likelihood
        self.sigma = sigma
        if likelihood == "gaussian-learned":
            # The inverse of log_sigma()'s soft floor, so training starts at exactly `sigma`.
            start = math.log(sigma) - MIN_LOG_SIGMA
            self.raw_log_sigma = nn.Parameter(torch.tensor(MIN_LOG_SIGMA + start + math.log(-math.expm1(-start))))
        if isinstance(image_resolution, int):  # VAE(32) means 32x32
            image_resolution = (image_resolution, image_resolution)
        self.image_resolution = tuple(image_resolution)
        self.image_channels = image_channels
        self.latent_size = latent_size
        channels = list(channels) if channels else default_channels(min(self.image_resolution))
        self.encoder = Encoder(self.image_resolution, image_channels, latent_size, channels, batch_norm)
        self.sample_latent = SampleLatent(latent_size)
        self.decoder = Decoder(self.image_resolution, image_channels, latent_size, channels, batch_norm)

    def forward(self, x):
        mean, log_var = self.encoder(x)
        z = self.sample_latent(mean, log_var)
        return self.decoder(z), mean, log_var

    def log_sigma(self):
        """log sigma of the Gaussian decoder (a floored parameter when learned); None for Bernoulli."""
        if self.likelihood == "gaussian-learned":
            return MIN_LOG_SIGMA + F.softplus(self.raw_log_sigma - MIN_LOG_SIGMA)
        if self.likelihood == "gaussian":
            return torch.tensor(math.log(self.sigma), device=self.decoder.project.weight.device)
        return None

    def encode(self, x):
        return self.encoder(x)

    def decode(self, z):
        return self.decoder(z)

    @torch.no_grad()
    def sample(self, num_images, temperature=1.0, generator=None):
        """Decode num_images draws z ~ N(0, temperature^2 I)."""
        device = next(self.parameters()).device
        z = torch.randn(num_images, self.latent_size, device=device, generator=generator) * temperature
        return self.decode(z)


def build_model(config) -> VAE:
    """The VAE a TrainConfig (or its saved dict) describes."""
    get = config.get if isinstance(config, dict) else lambda name: getattr(config, name)
    resolution = get("resolution")
    return VAE((resolution, resolution), latent_size=get("latent_size"), channels=get("channels"),
               batch_norm=get("batch_norm"), likelihood=get("likelihood"), sigma=get("sigma"))
