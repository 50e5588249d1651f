"""The VAE's building blocks: a convolutional Encoder, the reparameterised SampleLatent, a Decoder.

Every size is derived from the image resolution, the channels of the stages and the latent size, so the
same code serves 32x32, 64x64 or any resolution divisible by 2 ** len(channels).
"""

import torch
from torch import nn

SEED_CHANNELS = (16, 32, 64)


def _check_resolution(image_resolution, channels):
    height, width = image_resolution
    factor = 2 ** len(channels)
    if height % factor or width % factor:
        raise ValueError(f"image resolution {height}x{width} must be divisible by {factor} "
                         f"(2 ** {len(channels)} down-sampling stages); use a multiple of {factor}")
    return height // factor, width // factor


class Encoder(nn.Module):
    """x -> (mean, log_var) of the diagonal Gaussian q(z|x).

    Each stage is Conv2d 3x3 ("same" padding) -> [BatchNorm] -> ReLU -> MaxPool 2, halving the image.
    """

    def __init__(self, image_resolution=(32, 32), image_channels=3, latent_size=10,
                 channels=SEED_CHANNELS, batch_norm=False):
        super().__init__()
        feature_height, feature_width = _check_resolution(image_resolution, channels)
        stages = []
        in_channels = image_channels
        for out_channels in channels:
            stages += [nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)]
            if batch_norm:
                stages += [nn.BatchNorm2d(out_channels)]
            stages += [nn.ReLU(), nn.MaxPool2d(2)]
            in_channels = out_channels
        self.features = nn.Sequential(*stages, nn.Flatten())
        flat_size = in_channels * feature_height * feature_width
        self.mean = nn.Linear(flat_size, latent_size)
        self.log_var = nn.Linear(flat_size, latent_size)

    def forward(self, x):
        h = self.features(x)
        return self.mean(h), self.log_var(h)


class SampleLatent(nn.Module):
    """The reparameterisation trick: z = mean + exp(0.5 * log_var) * eps with eps ~ N(0, I).

    The noise is made like `mean` (same device and dtype), so gradients flow to mean and log_var.
    """

    def __init__(self, latent_size=10):
        super().__init__()
        self.latent_size = latent_size

    def forward(self, mean, log_var):
        eps = torch.randn_like(mean)
        return mean + torch.exp(0.5 * log_var) * eps


class Decoder(nn.Module):
    """z -> image in [0, 1]: Linear, reshape, one ConvTranspose2d (kernel 2, stride 2) per stage.

    ReLU (after optional BatchNorm) sits between the transposed convolutions; a Sigmoid ends it, so the output
    is a Gaussian mean or a Bernoulli probability in [0, 1] for every likelihood.
    """

    def __init__(self, image_resolution=(32, 32), image_channels=3, latent_size=10,
                 channels=SEED_CHANNELS, batch_norm=False):
        super().__init__()
        self.feature_height, self.feature_width = _check_resolution(image_resolution, channels)
        self.first_channels = channels[-1]
        self.project = nn.Linear(latent_size, self.first_channels * self.feature_height * self.feature_width)
        widths = list(reversed(channels)) + [image_channels]
        layers = []
        for i, (in_channels, out_channels) in enumerate(zip(widths[:-1], widths[1:])):
            layers += [nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)]
            if i < len(widths) - 2:
                if batch_norm:
                    layers += [nn.BatchNorm2d(out_channels)]
                layers += [nn.ReLU()]
        layers += [nn.Sigmoid()]
        self.upsample = nn.Sequential(*layers)

    def forward(self, z):
        h = self.project(z).view(-1, self.first_channels, self.feature_height, self.feature_width)
        return self.upsample(h)
