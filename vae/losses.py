"""The VAE objective. Pure functions; every value is in nats per image unless a name says otherwise.

Likelihoods p(x|z) of the decoder, whose output is in [0, 1] in every case:
- "gaussian" (the seed's): N(x; x_hat, sigma^2 I) with fixed sigma. Its training loss is SSE / (2 sigma^2);
  the constant D * log(sigma * sqrt(2 pi)), D = C*H*W, is dropped because it has no gradient. With the
  default sigma = 1/sqrt(2) the loss is exactly the per-image sum of squared error (SSE), and
  SSE + beta * KL is proportional to the beta = 1 ELBO with sigma^2 = beta / 2 (sigma ~ 0.22 for beta 0.1).
- "gaussian-learned": the same Gaussian with one shared, learned log sigma (sigma-VAE, Rybkin et al. 2021);
  the full negative log-likelihood is the loss, since log sigma now has a gradient.
- "bernoulli": the seed's option 2, summed binary cross-entropy of x against x_hat. On pixels that are not
  0 or 1 it is not a normalized likelihood (the continuous Bernoulli of Loaiza-Ganem & Cunningham 2019 is),
  so no bits/dim is reported for it.
- "logistic": per pixel a logistic of its own mean and scale, discretized to the 256 levels of 8-bit pixels
  (PixelCNN++, Salimans et al. 2017, with a single component). It is a probability mass function, so the loss
  is exactly -log P(x|z), a code length in nats, and bits/dim from it needs no correction.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

SEED_SIGMA = 1 / math.sqrt(2)
LIKELIHOODS = ("gaussian", "gaussian-learned", "bernoulli", "logistic")
PIXEL_LEVELS = 255  # 8-bit pixels are k / 255, k = 0..255


def kl_per_dimension(mean, log_var):
    """KL(q(z|x) || N(0, I)) in nats for each image and latent dimension, closed form, shape (batch, D): a
    spatial latent (batch, C, H, W) is flattened to D = C*H*W dimensions."""
    return 0.5 * (mean.pow(2) + log_var.exp() - 1.0 - log_var).flatten(1)


def kl_divergence(mean, log_var):
    """KL(q(z|x) || N(0, I)) per image (nats), shape (batch,)."""
    return kl_per_dimension(mean, log_var).sum(dim=1)


def sum_squared_error(x, reconstruction):
    """Per-image sum of squared error over channels and pixels, shape (batch,)."""
    return (reconstruction - x).pow(2).flatten(1).sum(dim=1)


def gaussian_nll_from_sse(sse, log_sigma, num_dims):
    """-log N(x; x_hat, sigma^2 I) in nats per image from the per-image SSE, log sigma (a tensor keeps its
    gradient) and D = num_dims."""
    log_sigma = torch.as_tensor(log_sigma, dtype=sse.dtype, device=sse.device)
    return sse * (0.5 * torch.exp(-2 * log_sigma)) + num_dims * (log_sigma + 0.5 * math.log(2 * math.pi))


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


def _resolve_log_scale(likelihood, log_sigma):
    if log_sigma is not None:
        return log_sigma
    if likelihood == "logistic":
        raise ValueError("the logistic likelihood needs the decoder's per-pixel log scale: pass "
                         "log_sigma=model.decode_distribution(z)[1] (or model(x, return_log_scale=True)[3])")
    return math.log(SEED_SIGMA)


def reconstruction_loss(x, reconstruction, likelihood="gaussian", log_sigma=None):
    """The reconstruction term that is trained, per image (batch,): -log p(x|z) up to a constant for "gaussian"
    (SSE / (2 sigma^2)), exactly -log p(x|z) in nats for the other likelihoods.

    log_sigma: log sigma of the Gaussians (default log(1/sqrt(2)), the seed's), or the per-pixel log scale of
    the logistic (required), shaped like x; unused by the Bernoulli.
    """
    log_sigma = _resolve_log_scale(likelihood, log_sigma)
    if likelihood == "bernoulli":
        return F.binary_cross_entropy(reconstruction, x, reduction="none").flatten(1).sum(dim=1)
    if likelihood == "logistic":
        return discretized_logistic_nll(x, reconstruction, log_sigma)
    sse = sum_squared_error(x, reconstruction)
    if likelihood == "gaussian":
        return sse * (0.5 * torch.exp(-2 * torch.as_tensor(log_sigma, dtype=sse.dtype, device=sse.device)))
    if likelihood == "gaussian-learned":
        return gaussian_nll_from_sse(sse, log_sigma, x[0].numel())
    raise ValueError(f"unknown likelihood {likelihood!r}; use one of {', '.join(LIKELIHOODS)}")


def reconstruction_nll(x, reconstruction, likelihood="gaussian", log_sigma=None):
    """-log p(x|z) in nats per image (batch,), constants included (a density for the Gaussians, a probability
    for the logistic). log_sigma as in reconstruction_loss."""
    if likelihood == "gaussian":
        return gaussian_nll_from_sse(sum_squared_error(x, reconstruction), _resolve_log_scale(likelihood, log_sigma),
                                     x[0].numel())
    return reconstruction_loss(x, reconstruction, likelihood, log_sigma)


class ELBOLoss(nn.Module):
    """total = beta * KL + reconstruction, each averaged over the batch; returns (beta, kl, reconstruction, total).

    With the defaults this is the seed's loss: reconstruction = per-image SSE, kl = closed-form KL.
    free_bits (nats) floors the batch-mean KL of each latent dimension inside `total` (Kingma et al. 2016);
    the returned kl is always the raw KL. beta may be changed between steps (KL schedules do).
    """

    def __init__(self, beta=0.1, likelihood="gaussian", free_bits=0.0):
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {likelihood!r}; use one of {', '.join(LIKELIHOODS)}")
        self.beta = beta
        self.likelihood = likelihood
        self.free_bits = free_bits

    def forward(self, x, reconstruction, mean, log_var, log_sigma=None):
        """log_sigma: the Gaussian's log sigma (default the seed's), or the logistic's per-pixel log scale."""
        kl_dims = kl_per_dimension(mean, log_var).mean(dim=0)
        kl = kl_dims.sum()
        kl_term = kl_dims.clamp(min=self.free_bits).sum() if self.free_bits > 0 else kl
        reconstruction_term = reconstruction_loss(x, reconstruction, self.likelihood, log_sigma).mean()
        total = self.beta * kl_term + reconstruction_term
        return self.beta, kl, reconstruction_term, total
