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
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

SEED_SIGMA = 1 / math.sqrt(2)
LIKELIHOODS = ("gaussian", "gaussian-learned", "bernoulli")


def kl_per_dimension(mean, log_var):
    """KL(q(z|x) || N(0, I)) for each image and latent dimension, closed form, shape (batch, latent)."""
    return 0.5 * (mean.pow(2) + log_var.exp() - 1.0 - log_var)


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


def reconstruction_loss(x, reconstruction, likelihood="gaussian", log_sigma=math.log(SEED_SIGMA)):
    """The reconstruction term that is trained, per image (batch,): -log p(x|z) up to a constant for "gaussian"
    (SSE / (2 sigma^2)), exactly -log p(x|z) in nats for the other likelihoods."""
    if likelihood == "bernoulli":
        return F.binary_cross_entropy(reconstruction, x, reduction="none").flatten(1).sum(dim=1)
    sse = sum_squared_error(x, reconstruction)
    if likelihood == "gaussian":
        return sse * (0.5 * torch.exp(-2 * torch.as_tensor(log_sigma, dtype=sse.dtype, device=sse.device)))
    if likelihood == "gaussian-learned":
        return gaussian_nll_from_sse(sse, log_sigma, x[0].numel())
    raise ValueError(f"unknown likelihood {likelihood!r}; use one of {', '.join(LIKELIHOODS)}")


def reconstruction_nll(x, reconstruction, likelihood="gaussian", log_sigma=math.log(SEED_SIGMA)):
    """-log p(x|z) in nats per image (batch,), constants included (a density for the Gaussians)."""
    if likelihood == "gaussian":
        return gaussian_nll_from_sse(sum_squared_error(x, reconstruction), log_sigma, x[0].numel())
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
        if log_sigma is None:
            log_sigma = math.log(SEED_SIGMA)
        kl_dims = kl_per_dimension(mean, log_var).mean(dim=0)
        kl = kl_dims.sum()
        kl_term = kl_dims.clamp(min=self.free_bits).sum() if self.free_bits > 0 else kl
        reconstruction_term = reconstruction_loss(x, reconstruction, self.likelihood, log_sigma).mean()
        total = self.beta * kl_term + reconstruction_term
        return self.beta, kl, reconstruction_term, total
