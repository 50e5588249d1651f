"""Measurements of a trained VAE. Pure functions; units in each docstring."""

import torch

ACTIVE_UNIT_THRESHOLD = 0.01


def active_units(posterior_means, threshold=ACTIVE_UNIT_THRESHOLD):
    """Number of latent dimensions whose posterior mean varies across images: Var_x(E_q[z_d|x]) > threshold
    (Burda et al. 2016). posterior_means: (num_images, latent). A collapsed model has few."""
    return int((posterior_variance(posterior_means) > threshold).sum())


def posterior_variance(posterior_means):
    """Var_x(E_q[z|x]) per latent dimension, shape (latent,)."""
    return posterior_means.double().var(dim=0, unbiased=True).float() if len(posterior_means) > 1 \
        else torch.zeros(posterior_means.shape[1])


def psnr_db(mse):
    """Peak signal-to-noise ratio in dB of images in [0, 1] with mean squared error mse (over all pixels)."""
    return 10 * torch.log10(1 / torch.as_tensor(mse, dtype=torch.float64)).item()
