"""Measurements of a trained VAE. Pure functions; units in each docstring."""

import math

import torch

from vae.losses import PIXEL_LEVELS, discretized_logistic_log_probs

ACTIVE_UNIT_THRESHOLD = 0.01


def active_units(variance, threshold=ACTIVE_UNIT_THRESHOLD):
    """Number of latent dimensions whose posterior mean varies across images: Var_x(E_q[z_d|x]) > threshold
    (Burda et al. 2016). variance: (D,), the variance over images of each dimension's posterior mean. A collapsed
    model has few."""
    return int((torch.as_tensor(variance) > threshold).sum())


def psnr_db(mse):
    """Peak signal-to-noise ratio in dB of images in [0, 1] with mean squared error mse (over all pixels)."""
    return 10 * torch.log10(1 / torch.as_tensor(mse, dtype=torch.float64)).item()


# ------------------------------------------------------------------------------ likelihoods of 8-bit data

def _log_sub_exp(log_a, log_b):
    """log(exp(log_a) - exp(log_b)) for log_a >= log_b, without forming the (possibly tiny) difference."""
    return log_a + torch.log(-torch.expm1(log_b - log_a))


def discretized_gaussian_log_likelihood(x, mean, log_sigma):
    """log P(x | mean, sigma) in nats per image (batch,) of 8-bit images x in [0, 1] under a Gaussian
    N(mean, sigma^2) discretized to the 256 pixel levels.

    Each level k/255 owns the bin [x - 1/510, x + 1/510]; the bins of 0 and 1 extend to -inf and +inf
    (as PixelCNN++ does), so the probabilities of the 256 levels sum to one and -log P is a code length.
    Computed in float64 with log-CDFs, because a bin can hold far less mass than float32 resolves next to 1
    (on the CPU for MPS tensors: MPS has no float64).
    """
    if x.device.type == "mps":
        x, mean, log_sigma = x.cpu(), mean.cpu(), torch.as_tensor(log_sigma).cpu()
    x, mean = x.double(), mean.double()
    sigma = torch.as_tensor(log_sigma, dtype=torch.float64, device=x.device).exp()
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


def discretized_log_likelihood(x, image, log_scale, likelihood):
    """log P(x|z) in nats per image (batch,) of 8-bit images x in [0, 1] under the decoder's likelihood
    discretized to the 256 pixel levels, or None for "bernoulli" (not a distribution over 8-bit pixels).

    image, log_scale: the decoder's output, as VAE.decode_distribution gives them (log sigma for the Gaussians,
    the per-pixel log scale for the logistic, whose training loss is already this probability). Computed in
    float64 (on the CPU for MPS tensors), like discretized_gaussian_log_likelihood.
    """
    if likelihood in ("gaussian", "gaussian-learned"):
        return discretized_gaussian_log_likelihood(x, image, log_scale)
    if likelihood == "bernoulli":
        return None
    if likelihood != "logistic":
        raise ValueError(f"unknown likelihood {likelihood!r}")
    if x.device.type == "mps":
        x, image, log_scale = x.cpu(), image.cpu(), log_scale.cpu()
    return discretized_logistic_log_probs(x.double(), image.double(), log_scale.double()).flatten(1).sum(dim=1)


def bits_per_dim(nll_nats, num_dims):
    """Negative log-likelihood in nats per image -> bits per dimension: nll / (D ln 2), D = C*H*W."""
    return nll_nats / (num_dims * math.log(2))


# ------------------------------------------------------------------------------ importance sampling

def iwae_log_likelihood(log_weights):
    """Importance-weighted lower bound on log p(x) in nats per image (Burda et al. 2016).

    log_weights: (K, batch) values of log p(x|z_k) + log p(z_k) - log q(z_k|x) for K draws z_k ~ q(z|x).
    Returns log (1/K) sum_k exp(log_weights_k), shape (batch,); with K = 1 it is the single-sample ELBO.
    """
    return torch.logsumexp(log_weights, dim=0) - math.log(log_weights.shape[0])


# ------------------------------------------------------------------------------ variations of a photo

DIVERSITY_POOL = 8  # images are average-pooled to 8x8: structure and colour stay, pixel noise averages out


def pooled_distances(images, size=DIVERSITY_POOL):
    """RMSE (0-1 scale) between every two images (N, 3, H, W) in [0, 1] after average-pooling them to size x size
    (H and W multiples of size): an (N, N) matrix of how far apart they are in layout and colour."""
    features = torch.nn.functional.adaptive_avg_pool2d(images.double(), size).flatten(1)
    return torch.cdist(features, features) / math.sqrt(features.shape[1])


def mean_pairwise_rmse(images, size=DIVERSITY_POOL):
    """Mean pooled RMSE (pooled_distances) over all pairs of images, N >= 2."""
    if len(images) < 2:
        raise ValueError(f"pairwise distances need at least 2 images, got {len(images)}")
    pairs = torch.triu_indices(len(images), len(images), offset=1).unbind()
    return pooled_distances(images, size)[pairs].mean().item()


def same_class_pairwise_rmse(images, classes, size=DIVERSITY_POOL):
    """Mean pooled RMSE over the pairs of images that share a class, and the number of such pairs; (None, 0) when
    no two images share one."""
    classes = torch.as_tensor(classes)
    same = (classes[:, None] == classes[None, :]).triu(diagonal=1)
    if not same.any():
        return None, 0
    return pooled_distances(images, size)[same].mean().item(), int(same.sum())
