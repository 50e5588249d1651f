"""The decoder's likelihoods p(x|z): one class each, registered under its --likelihood name.

A likelihood owns everything that depends on it, its parameters included:
- output_channels(C): how many maps the decoder's last layer gives for C image channels, and initialize(layer),
  where that layer starts;
- forward(maps) -> parameters: the parameters of p(x|z) made from the decoder's maps. They are opaque: only the
  likelihood that made them reads them, so a likelihood may hold any parameters (a mean, a mean and a scale per
  pixel, a mixture's weights, means and scales);
- mean(parameters): the image in [0, 1] they describe (the mean, or the Bernoulli's probability);
- loss(x, parameters): the reconstruction term that is trained, per image (nats, up to a constant);
- nll(x, parameters): -log p(x|z) in nats per image, constants included;
- log_likelihood_8bit(x, parameters): log P(x|z) in nats per image of the 8-bit pixels, for bits/dim, or None with
  the reason in `no_bits_per_dim`;
- any parameter it learns (an nn.Module parameter, saved with the model).

Adding one is a subclass with a `name`, decorated with @register. Every value is per image (batch,).

The four here:
- "gaussian" (the tutorial's): N(x; x_hat, sigma^2 I) with fixed sigma; its parameters are the mean x_hat itself, so
  ELBOLoss(beta)(x, reconstruction, mean, log_var) is the tutorial's loss. Its training loss is SSE / (2 sigma^2);
  the constant D * log(sigma * sqrt(2 pi)), D = C*H*W, is dropped because it has no gradient. With the default
  sigma = 1/sqrt(2) the loss is exactly the per-image sum of squared error (SSE), and SSE + beta * KL is
  proportional to the beta = 1 ELBO with sigma^2 = beta / 2 (sigma ~ 0.22 for beta 0.1).
- "gaussian-learned": the same Gaussian with one shared, learned log sigma (sigma-VAE, Rybkin et al. 2021); the
  full negative log-likelihood is the loss, since log sigma now has a gradient.
- "bernoulli": the tutorial's option 2, summed binary cross-entropy of x against x_hat. On pixels that are not 0
  or 1 it is not a normalized likelihood (the continuous Bernoulli of Loaiza-Ganem & Cunningham 2019 is), so it
  has no bits/dim.
- "logistic": per pixel a logistic of its own mean and scale, discretized to the 256 levels of 8-bit pixels
  (PixelCNN++, Salimans et al. 2017, with a single component). It is a probability mass function, so its loss is
  exactly -log P(x|z), a code length in nats, and bits/dim from it needs no correction.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

TUTORIAL_SIGMA = 1 / math.sqrt(2)  # the tutorial's fixed sigma: its loss is then the plain SSE
PIXEL_LEVELS = 255  # 8-bit pixels are k / 255, k = 0..255

# Floor on the learned log sigma (sigma ~ 0.0025), as sigma-VAE's soft clip does: below it the Gaussian density of
# 8-bit pixels is no longer a meaningful model of the data.
MIN_LOG_SIGMA = -6.0
# Soft floor on the logistic's per-pixel log scale: PixelCNN++ clamps at -7 (scale ~ 0.0009, a quarter of a pixel
# bin); below it the bin holds all the mass and the scale stops mattering, so it would only drift.
MIN_LOG_SCALE = -7.0
# The logistic's log scale at initialisation: a logistic with scale 1/(2 pi) has the standard deviation of uniform
# pixels, 1/sqrt(12), so training starts near 8 bits/dim, not at the far worse scale 1 an unbiased output gives.
INITIAL_LOG_SCALE = -math.log(2 * math.pi)

LIKELIHOODS = {}  # --likelihood name -> class


def register(cls):
    """Class decorator: make a Likelihood subclass available as --likelihood cls.name."""
    LIKELIHOODS[cls.name] = cls
    return cls


def make_likelihood(likelihood="gaussian", sigma=TUTORIAL_SIGMA):
    """A Likelihood from its name (sigma is the Gaussians' fixed or initial sigma), or `likelihood` itself when it is
    one already."""
    if isinstance(likelihood, Likelihood):
        return likelihood
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"unknown likelihood {likelihood!r}; use one of {', '.join(LIKELIHOODS)}")
    return LIKELIHOODS[likelihood](sigma=sigma)


def soft_floor(value, floor):
    """floor + softplus(value - floor): about `value` well above `floor`, never below it, with a gradient."""
    return floor + F.softplus(value - floor)


# ------------------------------------------------------------------------------ the pure functions

def sum_squared_error(x, reconstruction):
    """Per-image sum of squared error over channels and pixels, shape (batch,)."""
    return (reconstruction - x).pow(2).flatten(1).sum(dim=1)


def gaussian_nll_from_sse(sse, log_sigma, num_dims):
    """-log N(x; x_hat, sigma^2 I) in nats per image from the per-image SSE, log sigma (a tensor keeps its
    gradient) and D = num_dims."""
    log_sigma = torch.as_tensor(log_sigma, dtype=sse.dtype, device=sse.device)
    return sse * (0.5 * torch.exp(-2 * log_sigma)) + num_dims * (log_sigma + 0.5 * math.log(2 * math.pi))


def _log_sub_exp(log_a, log_b):
    """log(exp(log_a) - exp(log_b)) for log_a >= log_b, without forming the (possibly tiny) difference."""
    return log_a + torch.log(-torch.expm1(log_b - log_a))


def _float64(*tensors):
    """The tensors in float64, on the CPU when they are on MPS (which has no float64)."""
    return [torch.as_tensor(t).cpu().double() if t.device.type == "mps" else torch.as_tensor(t).double()
            for t in tensors]


def discretized_gaussian_log_likelihood(x, mean, log_sigma):
    """log P(x | mean, sigma) in nats per image (batch,) of 8-bit images x in [0, 1] under a Gaussian
    N(mean, sigma^2) discretized to the 256 pixel levels.

    Each level k/255 owns the bin [x - 1/510, x + 1/510]; the bins of 0 and 1 extend to -inf and +inf
    (as PixelCNN++ does), so the probabilities of the 256 levels sum to one and -log P is a code length.
    Computed in float64 with log-CDFs, because a bin can hold far less mass than float32 resolves next to 1
    (on the CPU for MPS tensors: MPS has no float64).
    """
    log_sigma = torch.as_tensor(log_sigma, device=x.device)
    x, mean, log_sigma = _float64(x, mean, log_sigma)
    sigma = log_sigma.exp()
    level = torch.round(x * PIXEL_LEVELS)
    half_bin = 0.5 / PIXEL_LEVELS
    lower = torch.where(level <= 0, -math.inf, (x - half_bin - mean) / sigma)
    upper = torch.where(level >= PIXEL_LEVELS, math.inf, (x + half_bin - mean) / sigma)
    # Phi(upper) - Phi(lower) loses every digit when both are near 1; there, use 1 - Phi(-t) symmetry instead.
    right_of_mean = (x - mean) > 0
    log_mass = torch.where(
        right_of_mean,
        _log_sub_exp(torch.special.log_ndtr(-lower), torch.special.log_ndtr(-upper)),
        _log_sub_exp(torch.special.log_ndtr(upper), torch.special.log_ndtr(lower)))
    return log_mass.flatten(1).sum(dim=1)


def discretized_logistic_log_probs(x, mean, log_scale):
    """log P(x) in nats for each pixel (same shape as x) of 8-bit pixels x = k/255 in [0, 1] under a logistic
    of the given mean and log scale discretized to the 256 levels (PixelCNN++, Salimans et al. 2017).

    Level k owns the bin [x - 1/510, x + 1/510] of width 1/255; the bins of 0 and 1 extend to -inf and +inf,
    so the 256 probabilities sum to one. With a = (x + 1/510 - mean) / s and b = (x - 1/510 - mean) / s,
    an inner bin holds sigmoid(a) - sigmoid(b) = sigmoid(a) * sigmoid(-b) * (1 - exp(b - a)), whose log is
    formed from log-sigmoids and expm1 without subtracting two probabilities: exact in float32 even where
    PixelCNN++'s difference of CDFs underflows and it falls back to the density times the bin width.
    """
    half_bin = 0.5 / PIXEL_LEVELS
    inverse_scale = torch.exp(-log_scale)
    upper = (x - mean + half_bin) * inverse_scale
    lower = (x - mean - half_bin) * inverse_scale
    level = torch.round(x * PIXEL_LEVELS)
    bottom = F.logsigmoid(upper)  # the bin of 0: P(X < upper)
    top = F.logsigmoid(-lower)  # the bin of 1: P(X > lower)
    inner = bottom + top + torch.log(-torch.expm1(-inverse_scale / PIXEL_LEVELS))  # upper - lower = (1/255) / s
    return torch.where(level <= 0, bottom, torch.where(level >= PIXEL_LEVELS, top, inner))


def discretized_logistic_nll(x, mean, log_scale):
    """-log P(x) in nats per image (batch,) under the per-pixel discretized logistic (see
    discretized_logistic_log_probs); log_scale is per pixel or broadcasts to x."""
    return -discretized_logistic_log_probs(x, mean, log_scale).flatten(1).sum(dim=1)


# ------------------------------------------------------------------------------ the likelihoods

class Likelihood(nn.Module):
    """p(x|z) of the decoder. Subclasses set `name` (and `help`, the --likelihood help), override nll and, where
    they differ from it, forward and mean (the parameters and the image they describe), loss and
    log_likelihood_8bit.

    Here the parameters are the image in [0, 1] itself (the sigmoid of one map per channel), as for the Gaussians
    and the Bernoulli, whose other parameters (sigma) are the likelihood's own.
    """

    name = None
    help = ""
    maps_per_channel = 1  # decoder maps per image channel
    # Why there is no bits/dim, for a likelihood without log_likelihood_8bit; None for those with one.
    no_bits_per_dim = ("the {name} likelihood defines no log-likelihood of 8-bit pixels (log_likelihood_8bit), so it "
                       "has no bits/dim")
    discretized = ""  # the distribution log_likelihood_8bit discretizes, for the bits/dim note
    default_beta = None  # the KL weight training defaults to with this likelihood (None: --beta's default)

    def output_channels(self, image_channels):
        return self.maps_per_channel * image_channels

    def initialize(self, layer):
        """Start the decoder's last layer (a convolution giving forward's maps) where training should start."""

    def forward(self, maps):
        """Decoder maps (batch, output_channels, H, W) -> the parameters of p(x|z), read only by this likelihood.
        In float32: under bf16 autocast a bf16 sigmoid resolves [0.5, 1] in steps of 1/256, a whole pixel bin,
        which a sharp likelihood would pay for."""
        return torch.sigmoid(maps.float())

    def mean(self, parameters):
        """The image (batch, C, H, W) in [0, 1] that the parameters describe: what reconstructions and samples
        show."""
        return parameters

    def shared_sigma(self):
        """sigma shared by every pixel as a float (the Gaussians'), or None."""
        return None

    def nll(self, x, parameters):
        raise NotImplementedError

    def loss(self, x, parameters):
        return self.nll(x, parameters)

    def log_likelihood_8bit(self, x, parameters):
        return None

    def log_likelihoods(self, x, parameters, discretized=True):
        """(log p(x|z) under this likelihood, log P(x|z) of the 8-bit pixels or None), per image, in float64."""
        eight_bit = self.log_likelihood_8bit(x, parameters) if discretized else None
        return -self.nll(x, parameters).double(), eight_bit


@register
class Gaussian(Likelihood):
    name = "gaussian"
    help = "fixed --sigma (1/sqrt(2) makes the loss the tutorial's sum of squared error)"
    discretized = "Gaussian"
    no_bits_per_dim = None

    def __init__(self, sigma=TUTORIAL_SIGMA):
        super().__init__()
        if not sigma > 0:
            raise ValueError(f"--sigma (of the Gaussian likelihood) must be > 0, got {sigma}")
        self.sigma = sigma

    def log_scale(self):
        """log sigma, shared by every pixel, as a 0-dim tensor."""
        return torch.tensor(math.log(self.sigma))

    def shared_sigma(self):
        return self.sigma

    def nll(self, x, parameters):
        return gaussian_nll_from_sse(sum_squared_error(x, parameters), self._log_sigma(), x[0].numel())

    def loss(self, x, parameters):
        log_sigma = torch.as_tensor(self._log_sigma(), dtype=x.dtype, device=x.device)
        return sum_squared_error(x, parameters) * (0.5 * torch.exp(-2 * log_sigma))

    def log_likelihood_8bit(self, x, parameters):
        return discretized_gaussian_log_likelihood(x, parameters, self._log_sigma())

    def _log_sigma(self):
        return math.log(self.sigma)


@register
class GaussianLearned(Gaussian):
    """A learned log sigma, softly floored at MIN_LOG_SIGMA; it starts at exactly `sigma`."""

    name = "gaussian-learned"
    help = "one shared, learned sigma (starting at --sigma; trained at --sigma-lr)"
    default_beta = 1.0  # a learned sigma is calibrated by the ELBO itself, as in sigma-VAE

    def __init__(self, sigma=TUTORIAL_SIGMA):
        super().__init__(sigma)
        if not math.log(sigma) > MIN_LOG_SIGMA:
            raise ValueError(f"--sigma {sigma} is below the floor of the learned sigma "
                             f"({math.exp(MIN_LOG_SIGMA):.4f}); start higher")
        start = math.log(sigma) - MIN_LOG_SIGMA  # the inverse of the soft floor
        self.raw_log_sigma = nn.Parameter(torch.tensor(MIN_LOG_SIGMA + start + math.log(-math.expm1(-start))))

    def log_scale(self):
        return soft_floor(self.raw_log_sigma, MIN_LOG_SIGMA)

    def shared_sigma(self):
        return self.log_scale().exp().item()

    def loss(self, x, parameters):
        return self.nll(x, parameters)

    def _log_sigma(self):
        return self.log_scale()


@register
class Bernoulli(Likelihood):
    name = "bernoulli"
    help = "summed binary cross-entropy (not a distribution over 8-bit pixels: no bits/dim)"
    no_bits_per_dim = ("the bernoulli likelihood is not a normalized distribution over 8-bit pixels (binary "
                       "cross-entropy on non-binary data), so it has no bits/dim")

    def __init__(self, sigma=None):
        super().__init__()

    def nll(self, x, parameters):
        # binary_cross_entropy written out, with its clamp of each log at -100: F.binary_cross_entropy raises on a
        # NaN input, where a diverged run must get its one-line error from the NaN loss instead.
        log_p, log_not_p = torch.log(parameters).clamp(min=-100), torch.log1p(-parameters).clamp(min=-100)
        return -(x * log_p + (1 - x) * log_not_p).flatten(1).sum(dim=1)


@register
class Logistic(Likelihood):
    """Its parameters are the decoder's maps in float32: the logits of the C means, then the C raw log scales."""

    name = "logistic"
    help = "per-pixel mean and scale of a logistic discretized to 256 levels (PixelCNN++); the shipped models'"
    maps_per_channel = 2  # a mean and a log scale per pixel
    discretized = "logistic"
    no_bits_per_dim = None

    def __init__(self, sigma=None):
        super().__init__()

    def initialize(self, layer):
        with torch.no_grad():
            layer.bias[layer.out_channels // 2:] = INITIAL_LOG_SCALE

    def forward(self, maps):
        return maps.float()

    def mean_and_log_scale(self, parameters, x=None):
        """(mean, log scale) of each pixel's logistic, each (batch, C, H, W); x, when given, is checked to be an
        image these parameters describe."""
        if x is not None and parameters.shape[1] != self.output_channels(x.shape[1]):
            raise ValueError(f"the logistic likelihood needs the decoder's per-pixel log scale: pass its parameters "
                             f"(model.decode_parameters(z), or model(x, return_parameters=True)[0]), "
                             f"{self.output_channels(x.shape[1])} maps for {x.shape[1]} image channels, not "
                             f"{parameters.shape[1]}")
        logits, log_scale = parameters.chunk(2, dim=1)
        return torch.sigmoid(logits), soft_floor(log_scale, MIN_LOG_SCALE)

    def mean(self, parameters):
        return torch.sigmoid(parameters.chunk(2, dim=1)[0])

    def nll(self, x, parameters):
        return discretized_logistic_nll(x, *self.mean_and_log_scale(parameters, x))

    def log_likelihood_8bit(self, x, parameters):
        x, mean, log_scale = _float64(x, *self.mean_and_log_scale(parameters, x))
        return discretized_logistic_log_probs(x, mean, log_scale).flatten(1).sum(dim=1)

    def log_likelihoods(self, x, parameters, discretized=True):
        # It is a distribution over 8-bit pixels already: computed once, in float64.
        log_likelihood = self.log_likelihood_8bit(x, parameters)
        return log_likelihood, (log_likelihood if discretized else None)
