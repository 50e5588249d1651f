"""The decoder's likelihoods p(x|z): one class each, registered under its --likelihood name.

A likelihood owns everything that depends on it:
- output_channels(C): how many maps the decoder's last layer gives for C image channels, and initialize(layer),
  where that layer starts;
- forward(maps) -> (image, log_scale): the parameters of p(x|z). image is in [0, 1] (a mean, or the Bernoulli's
  probability); log_scale is a 0-dim log sigma (Gaussians), per-pixel log scales (logistic) or None;
- loss(x, image, log_scale): the reconstruction term that is trained, per image (nats, up to a constant);
- nll(x, image, log_scale): -log p(x|z) in nats per image, constants included;
- log_likelihood_8bit(x, image, log_scale): log P(x|z) in nats per image of the 8-bit pixels, for bits/dim, or None
  with the reason in `no_bits_per_dim`;
- any parameter it learns (an nn.Module parameter, saved with the model).

Adding one is a subclass with a `name`, decorated with @register. Every value is per image (batch,).

The four here:
- "gaussian" (the tutorial's): N(x; x_hat, sigma^2 I) with fixed sigma. Its training loss is SSE / (2 sigma^2);
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
    they differ from it, loss, log_likelihood_8bit and log_scale."""

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
        """Decoder maps (batch, output_channels, H, W) -> (image, log_scale). In float32: under bf16 autocast a
        bf16 sigmoid resolves [0.5, 1] in steps of 1/256, a whole pixel bin, which a sharp likelihood would pay for."""
        image = torch.sigmoid(maps.float())
        return image, self.log_scale(image)

    def log_scale(self, image):
        """The log scale shared by every pixel as a 0-dim tensor on image's device, or None."""
        return None

    def shared_sigma(self):
        """sigma shared by every pixel as a float (the Gaussians'), or None."""
        return None

    def nll(self, x, image, log_scale):
        raise NotImplementedError

    def loss(self, x, image, log_scale):
        return self.nll(x, image, log_scale)

    def log_likelihood_8bit(self, x, image, log_scale):
        return None

    def log_likelihoods(self, x, image, log_scale, discretized=True):
        """(log p(x|z) under this likelihood, log P(x|z) of the 8-bit pixels or None), per image, in float64."""
        eight_bit = self.log_likelihood_8bit(x, image, log_scale) if discretized else None
        return -self.nll(x, image, log_scale).double(), eight_bit


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

    def log_scale(self, image):
        return torch.tensor(math.log(self.sigma), device=image.device)

    def shared_sigma(self):
        return self.sigma

    def nll(self, x, image, log_scale):
        return gaussian_nll_from_sse(sum_squared_error(x, image), self._log_sigma(log_scale), x[0].numel())

    def loss(self, x, image, log_scale):
        log_sigma = torch.as_tensor(self._log_sigma(log_scale), dtype=x.dtype, device=x.device)
        return sum_squared_error(x, image) * (0.5 * torch.exp(-2 * log_sigma))

    def log_likelihood_8bit(self, x, image, log_scale):
        return discretized_gaussian_log_likelihood(x, image, self._log_sigma(log_scale))

    def _log_sigma(self, log_scale):
        return math.log(self.sigma) if log_scale is None else log_scale


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

    def log_scale(self, image=None):
        return soft_floor(self.raw_log_sigma, MIN_LOG_SIGMA)

    def shared_sigma(self):
        return self.log_scale().exp().item()

    def loss(self, x, image, log_scale):
        return self.nll(x, image, log_scale)

    def _log_sigma(self, log_scale):
        return self.log_scale() if log_scale is None else log_scale


@register
class Bernoulli(Likelihood):
    name = "bernoulli"
    help = "summed binary cross-entropy (not a distribution over 8-bit pixels: no bits/dim)"
    no_bits_per_dim = ("the bernoulli likelihood is not a normalized distribution over 8-bit pixels (binary "
                       "cross-entropy on non-binary data), so it has no bits/dim")

    def __init__(self, sigma=None):
        super().__init__()

    def nll(self, x, image, log_scale=None):
        # binary_cross_entropy written out, with its clamp of each log at -100: F.binary_cross_entropy raises on a
        # NaN input, where a diverged run must get its one-line error from the NaN loss instead.
        log_p, log_not_p = torch.log(image).clamp(min=-100), torch.log1p(-image).clamp(min=-100)
        return -(x * log_p + (1 - x) * log_not_p).flatten(1).sum(dim=1)


@register
class Logistic(Likelihood):
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
        logits, log_scale = maps.float().chunk(2, dim=1)
        return torch.sigmoid(logits), soft_floor(log_scale, MIN_LOG_SCALE)

    def nll(self, x, image, log_scale):
        if log_scale is None:
            raise ValueError("the logistic likelihood needs the decoder's per-pixel log scale: pass "
                             "log_scale=model.decode_distribution(z)[1] (or model(x, return_log_scale=True)[3])")
        return discretized_logistic_nll(x, image, log_scale)

    def log_likelihood_8bit(self, x, image, log_scale):
        x, image, log_scale = _float64(x, image, log_scale)
        return discretized_logistic_log_probs(x, image, log_scale).flatten(1).sum(dim=1)

    def log_likelihoods(self, x, image, log_scale, discretized=True):
        # It is a distribution over 8-bit pixels already: computed once, in float64.
        log_likelihood = self.log_likelihood_8bit(x, image, log_scale)
        return log_likelihood, (log_likelihood if discretized else None)
