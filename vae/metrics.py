"""Measurements of a trained VAE. Pure functions; units in each docstring."""

import math

import torch

ACTIVE_UNIT_THRESHOLD = 0.01


def active_units(variance, threshold=ACTIVE_UNIT_THRESHOLD):
    """Number of latent dimensions whose posterior mean varies across images: Var_x(E_q[z_d|x]) > threshold
    (Burda et al. 2016). variance: (D,), the variance over images of each dimension's posterior mean. A collapsed
    model has few."""
    return int((torch.as_tensor(variance) > threshold).sum())


def psnr_db(mse):
    """Peak signal-to-noise ratio in dB of images in [0, 1] with mean squared error mse (over all pixels)."""
    return 10 * torch.log10(1 / torch.as_tensor(mse, dtype=torch.float64)).item()


# ------------------------------------------------------------------------------ bits/dim and importance sampling

def bits_per_dim(nll_nats, num_dims):
    """Negative log-likelihood in nats per image -> bits per dimension: nll / (D ln 2), D = C*H*W."""
    return nll_nats / (num_dims * math.log(2))


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
