"""VAE: the model the scripts import."""

import contextlib
import inspect
import math

import torch
from torch import nn

from vae.layers import ARCHITECTURES, SampleLatent, architecture, architecture_options
from vae.likelihoods import TUTORIAL_SIGMA, make_likelihood


class VAE(nn.Module):
    """Encoder -> SampleLatent -> Decoder -> likelihood. forward(x) returns (reconstruction, mean, log_var).

    With the defaults (32x32 RGB, latent 10, arch "seed" with channels 16/32/64) this is the tutorial's model,
    65,831 parameters. arch names the encoder and decoder, a builder registered in vae.layers.ARCHITECTURES, and
    **options are that builder's options (seed: channels, batch_norm; resnet: width, space_to_depth, stage_channels,
    stage_blocks), which it checks; another architecture's options are refused unless at their defaults.
    latent_shape (C, H, W) gives a spatial latent, where the architecture has one, instead of the dense one of
    latent_size. Either way `latent_shape` is the shape of one image's z and `latent_size` its number of dimensions.
    likelihood: a name of vae.likelihoods.LIKELIHOODS (sigma is the Gaussians') or a Likelihood; it is the model's
    `likelihood` module, learned parameters included, and it alone reads the parameters of p(x|z) that
    decode_parameters(z) gives.
    """

    def __init__(self, image_resolution=(32, 32), latent_size=10, image_channels=3, likelihood="gaussian",
                 sigma=TUTORIAL_SIGMA, arch="seed", latent_shape=None, **options):
        super().__init__()
        options = architecture_options(arch, options)
        if latent_shape:
            latent_shape = tuple(latent_shape)
            if len(latent_shape) != 3 or min(latent_shape) < 1:
                raise ValueError(f"--latent-shape must be C H W, three positive sizes, got {latent_shape}")
        elif latent_size < 1:
            raise ValueError(f"--latent-size must be at least 1, got {latent_size}")
        else:
            latent_shape = (latent_size,)
        self.likelihood = make_likelihood(likelihood, sigma)
        self.arch = arch
        if isinstance(image_resolution, int):  # VAE(32) means 32x32
            image_resolution = (image_resolution, image_resolution)
        self.image_resolution = tuple(image_resolution)
        self.image_channels = image_channels
        self.latent_shape = latent_shape
        self.latent_size = math.prod(latent_shape)
        # The decoder gives the likelihood's maps; the likelihood turns them into its parameters.
        self.encoder, self.decoder = architecture(arch).build(
            self.image_resolution, image_channels, latent_shape, self.likelihood.output_channels(image_channels),
            **options)
        self.likelihood.initialize(self.decoder.output_layer)
        self.sample_latent = SampleLatent(self.latent_size)
        self._register_load_state_dict_pre_hook(rename_old_keys)

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


def rename_old_keys(state_dict, prefix, *args):
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
def posterior_mean_std(model, x):
    """(mean, standard deviation) of q(z|x), each (N, *latent_shape): the standard deviation, where encode gives
    the log-variance."""
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
            x = images_uint8[start:start + batch_size].to(device).float().div_(255)
            mean, std = posterior_mean_std(model, x)
            means.append(mean.flatten(1).cpu())
            stds.append(std.flatten(1).cpu())
    return torch.cat(means), torch.cat(stds)


def posterior_means(model, images_uint8, batch_size=256):
    """The posterior means E[z|x] of uint8 images, flattened to (N, latent_size), on the CPU."""
    return posterior_moments(model, images_uint8, batch_size)[0]


def build_model(config) -> VAE:
    """The VAE a TrainConfig (or its saved dict) describes: each of its settings that VAE or an architecture takes,
    by name. Settings newer than a checkpoint take the tutorial's values (VAE's and the builders' defaults), so old
    checkpoints build the model they were trained with."""
    names = [name for name in inspect.signature(VAE).parameters if name not in ("image_resolution", "options")]
    names += sorted({option for registered in ARCHITECTURES.values() for option in registered.options} - set(names))
    saved = config if isinstance(config, dict) else vars(config)
    resolution = saved.get("resolution", 32)
    return VAE((resolution, resolution), **{name: saved[name] for name in names if name in saved})
