"""VAE: the model the scripts import."""

import contextlib
import math

import torch
from torch import nn

from vae.layers import Decoder, Encoder, ResNetDecoder, ResNetEncoder, SampleLatent, default_channels
from vae.likelihoods import TUTORIAL_SIGMA, make_likelihood

ARCHITECTURES = ("seed", "resnet")


class VAE(nn.Module):
    """Encoder -> SampleLatent -> Decoder -> likelihood. forward(x) returns (reconstruction, mean, log_var).

    With the defaults (32x32 RGB, latent 10, channels 16/32/64) this is the tutorial's model, 65,831 parameters.
    arch="resnet" swaps in ResNetEncoder/ResNetDecoder of base `width` channels (or stage_channels, with
    stage_blocks residual blocks per stage, and a space-to-depth stem and pixel-shuffle output with
    space_to_depth); with it, latent_shape (C, H, W) gives a spatial latent instead of the dense one of latent_size.
    Either way `latent_shape` is the shape of one image's z and `latent_size` its number of dimensions.
    likelihood: a name of vae.likelihoods.LIKELIHOODS (sigma is the Gaussians') or a Likelihood; it is the model's
    `likelihood` module, learned parameters included, and it alone reads the parameters of p(x|z) that
    decode_parameters(z) gives.
    """

    def __init__(self, image_resolution=(32, 32), latent_size=10, image_channels=3, channels=None,
                 batch_norm=False, likelihood="gaussian", sigma=TUTORIAL_SIGMA, arch="seed", width=64,
                 latent_shape=None, space_to_depth=False, stage_channels=None, stage_blocks=None):
        super().__init__()
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown arch {arch!r}; use one of {', '.join(ARCHITECTURES)}")
        if latent_shape:
            latent_shape = tuple(latent_shape)
            if len(latent_shape) != 3 or min(latent_shape) < 1:
                raise ValueError(f"--latent-shape must be C H W, three positive sizes, got {latent_shape}")
        elif latent_size < 1:
            raise ValueError(f"--latent-size must be at least 1, got {latent_size}")
        else:
            latent_shape = (latent_size,)
        if arch == "seed" and len(latent_shape) == 3:
            raise ValueError(f"a spatial latent shape {latent_shape} needs --arch resnet; the tutorial's "
                             f"architecture has a dense latent (--latent-size)")
        if arch == "resnet" and (channels or batch_norm):
            raise ValueError("--channels and --batch-norm belong to --arch seed; the resnet's channels come from "
                             "--width (or --stage-channels), and it has no normalisation layers")
        if arch == "seed" and (space_to_depth or stage_channels or stage_blocks):
            raise ValueError("--space-to-depth, --stage-channels and --stage-blocks belong to --arch resnet")
        self.likelihood = make_likelihood(likelihood, sigma)
        self.arch = arch
        if isinstance(image_resolution, int):  # VAE(32) means 32x32
            image_resolution = (image_resolution, image_resolution)
        self.image_resolution = tuple(image_resolution)
        self.image_channels = image_channels
        self.latent_shape = latent_shape
        self.latent_size = math.prod(latent_shape)
        # The decoder gives the likelihood's maps; the likelihood turns them into its parameters.
        output = dict(output_channels=self.likelihood.output_channels(image_channels), head=nn.Identity())
        if arch == "resnet":
            stages = dict(space_to_depth=space_to_depth, stage_channels=stage_channels, stage_blocks=stage_blocks)
            self.encoder = ResNetEncoder(self.image_resolution, image_channels, latent_shape, width, **stages)
            self.decoder = ResNetDecoder(self.image_resolution, image_channels, latent_shape, width, **output,
                                         **stages)
        else:
            channels = list(channels) if channels else default_channels(min(self.image_resolution))
            for size in channels:
                if size < 1:
                    raise ValueError(f"--channels must be positive, got {channels}")
            self.encoder = Encoder(self.image_resolution, image_channels, latent_size, channels, batch_norm)
            self.decoder = Decoder(self.image_resolution, image_channels, latent_size, channels, batch_norm,
                                   **output)
        self.likelihood.initialize(self.decoder.output_layer)
        self.sample_latent = SampleLatent(self.latent_size)
        self._register_load_state_dict_pre_hook(_rename_old_keys)

    def forward(self, x, return_parameters=False):
        """(reconstruction, mean, log_var) for one draw z ~ q(z|x); with return_parameters=True (parameters, mean,
        log_var): the likelihood's parameters of p(x|z) in place of the image they describe, what ELBOLoss reads.
        For the Gaussians and the Bernoulli the two are the same tensor."""
        mean, log_var = self.encoder(x)
        parameters = self.decode_parameters(self.sample_latent(mean, log_var))
        if return_parameters:
            return parameters, mean, log_var
        return self.likelihood.mean(parameters), mean, log_var

    def encode(self, x):
        """x (batch, C, H, W) in [0, 1] -> (mean, log_var) of q(z|x), each (batch, *latent_shape)."""
        return self.encoder(x)

    def decode(self, z):
        """z (batch, *latent_shape) -> image (batch, C, H, W) in [0, 1]: the likelihood's mean (Gaussian,
        logistic) or probability (Bernoulli)."""
        return self.likelihood.mean(self.decode_parameters(z))

    def decode_parameters(self, z):
        """z -> the parameters of p(x|z), made by the likelihood from the decoder's maps and read only by it
        (model.likelihood.loss, nll, log_likelihood_8bit, mean)."""
        return self.likelihood(self.decoder(z))


def _rename_old_keys(state_dict, prefix, *args):
    """Checkpoints from before the likelihood was a module kept the learned log sigma as `raw_log_sigma`."""
    old = prefix + "raw_log_sigma"
    if old in state_dict:
        state_dict[prefix + "likelihood.raw_log_sigma"] = state_dict.pop(old)


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


@torch.no_grad()
def posterior(model, x):
    """(mean, std) of q(z|x), each (N, latent)."""
    mean, log_var = model.encode(x)
    return mean, log_var.mul(0.5).exp()


@torch.no_grad()
def posterior_moments(model, images_uint8, batch_size=256):
    """(means, stds) of q(z|x) for uint8 images, each flattened to (N, latent_size), on the CPU. Encoded in eval
    mode (BatchNorm's running statistics, which it leaves as they were), whatever mode the model is in."""
    device = next(model.parameters()).device
    means, stds = [], []
    with eval_mode(model):
        for start in range(0, len(images_uint8), batch_size):
            mean, std = posterior(model, images_uint8[start:start + batch_size].to(device).float().div_(255))
            means.append(mean.flatten(1).cpu())
            stds.append(std.flatten(1).cpu())
    return torch.cat(means), torch.cat(stds)


def posterior_means(model, images_uint8, batch_size=256):
    """The posterior means E[z|x] of uint8 images, flattened to (N, latent_size), on the CPU."""
    return posterior_moments(model, images_uint8, batch_size)[0]


def build_model(config) -> VAE:
    """The VAE a TrainConfig (or its saved dict) describes. Settings newer than a checkpoint take the tutorial's
    values, so old checkpoints build the model they were trained with."""
    def get(name, default):
        return config.get(name, default) if isinstance(config, dict) else getattr(config, name, default)

    resolution = get("resolution", 32)
    return VAE((resolution, resolution), latent_size=get("latent_size", 10), channels=get("channels", None),
               batch_norm=get("batch_norm", False), likelihood=get("likelihood", "gaussian"),
               sigma=get("sigma", TUTORIAL_SIGMA), arch=get("arch", "seed"), width=get("width", 64),
               latent_shape=get("latent_shape", None), space_to_depth=get("space_to_depth", False),
               stage_channels=get("stage_channels", None), stage_blocks=get("stage_blocks", None))
