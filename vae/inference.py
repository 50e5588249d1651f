"""What vae_inference.py does, as functions: load a trained VAE, make images with it, and measure it.

Images are float tensors in [0, 1] of shape (N, 3, H, W); latents are (N, latent_size). Every function
that draws noise takes a torch.Generator, so a --seed reproduces its output exactly.
"""

import math
from pathlib import Path

import torch
from torch.distributions import Normal
from torchvision.utils import save_image
from tqdm import tqdm

from datasets.preprocessing import cached_images, flowers102_files, holdout_split, load_image, to_float
from vae.checkpoint import load_checkpoint, restore_model
from vae.errors import UserError
from vae.losses import kl_per_dimension, reconstruction_nll, sum_squared_error
from vae.metrics import (active_units, bits_per_dim, discretized_gaussian_log_likelihood, iwae_log_likelihood,
                         posterior_variance, psnr_db, standard_error)
from vae.vae import build_model

# Decoded images held in memory at once while importance sampling: bounds memory for any K and resolution
# (4096 images of 64x64 are 200 MB in float32, about 1 GB with the float64 likelihood terms).
DECODE_CHUNK_IMAGES = 4096


# ------------------------------------------------------------------------------------------- loading

def load_model(checkpoint_path, device):
    """(model in eval mode on device, checkpoint dict). The checkpoint's config rebuilds the model."""
    checkpoint = load_checkpoint(checkpoint_path)
    model = restore_model(build_model(checkpoint["config"]), checkpoint, checkpoint_path)
    return model.to(device).eval(), checkpoint


def load_images(paths, model, device):
    """Image files (any size or format) preprocessed exactly as training did, as floats (N, 3, H, W)."""
    for path in paths:
        if not Path(path).is_file():
            raise UserError(f"image {path} does not exist")
    return to_float(torch.stack([load_image(path, model.image_resolution) for path in paths])).to(device)


def dataset_images(data_dir, split, resolution, subset="all", holdout=0.0, holdout_seed=0, cache_dir="",
                   num_workers=1, skip_bad_images=False):
    """(uint8 images (N, 3, R, R), their file names) of a Flowers102 split.

    subset "all" is the whole split; with holdout > 0, "held-out" is exactly the images a training run with
    --holdout HOLDOUT --seed HOLDOUT_SEED evaluated on, and "train" the ones it trained on.
    """
    images = cached_images(data_dir, split, resolution, cache_dir, num_workers, skip_bad_images)
    names = [f.name for f in flowers102_files(data_dir, split, download=False)]
    if len(names) != len(images):  # the cache skipped unreadable files: names no longer line up
        names = [f"{split}[{i}]" for i in range(len(images))]
    if subset == "all" or holdout <= 0:
        return images, names
    train_index, held_out_index = holdout_split(len(images), holdout, holdout_seed)
    index = held_out_index if subset == "held-out" else train_index
    return images[index], [names[i] for i in index.tolist()]


# -------------------------------------------------------------------------------------- making images

@torch.no_grad()
def posterior(model, x):
    """(mean, std) of q(z|x), each (N, latent)."""
    mean, log_var = model.encode(x)
    return mean, log_var.mul(0.5).exp()


@torch.no_grad()
def sample_prior(model, num_images, temperature, generator):
    """num_images decoded draws z ~ N(0, temperature^2 I); returns (images, z)."""
    z = torch.randn(num_images, model.latent_size, generator=generator).to(model_device(model))
    z = z * temperature
    return model.decode(z), z


@torch.no_grad()
def reconstruct(model, x):
    """Reconstructions decoded from the posterior mean (the deterministic, most likely code)."""
    return model.decode(posterior(model, x)[0])


@torch.no_grad()
def variations(model, x, num_variations, temperature, generator):
    """Decoded draws z = mean + temperature * std * eps around the posterior of one image x (1, 3, H, W).

    Returns (images (num_variations, 3, H, W), z, posterior mean (1, latent)).
    """
    mean, std = posterior(model, x)
    eps = torch.randn(num_variations, model.latent_size, generator=generator).to(mean.device)
    z = mean + temperature * std * eps
    return model.decode(z), z, mean


def lerp(a, b, t):
    return (1 - t) * a + t * b


def slerp(a, b, t):
    """Spherical interpolation of two vectors (White 2016): keeps the norm typical of Gaussian draws,
    which the straight line through the origin's low-density region does not. Falls back to lerp for
    (anti)parallel vectors, where the great circle is undefined."""
    cos_angle = torch.dot(a, b) / (a.norm() * b.norm()).clamp(min=1e-12)
    angle = torch.arccos(cos_angle.clamp(-1.0, 1.0))
    if torch.sin(angle).abs() < 1e-6:
        return lerp(a, b, t)
    return (torch.sin((1 - t) * angle) * a + torch.sin(t * angle) * b) / torch.sin(angle)


@torch.no_grad()
def interpolate(model, x_a, x_b, steps, spherical=False):
    """Decoded points on the path between the posterior means of x_a and x_b (each (1, 3, H, W)),
    endpoints included; returns images (steps, 3, H, W)."""
    mean_a, mean_b = posterior(model, x_a)[0][0], posterior(model, x_b)[0][0]
    path = slerp if spherical else lerp
    z = torch.stack([path(mean_a, mean_b, t) for t in torch.linspace(0, 1, steps).tolist()])
    return model.decode(z)


@torch.no_grad()
def traverse(model, center, value_range, steps):
    """One row per latent dimension d: decoded center + v * e_d for v from -range to +range.

    center: (latent,) (a posterior mean, or zeros). Returns images (latent * steps, 3, H, W), row-major.
    """
    values = torch.linspace(-value_range, value_range, steps, device=center.device)
    z = center.repeat(model.latent_size, steps, 1)  # (latent, steps, latent)
    for d in range(model.latent_size):
        z[d, :, d] = center[d] + values
    return model.decode(z.flatten(0, 1))


def save_grid(images, path, nrow, scale=1):
    """Write images (N, 3, H, W) in [0, 1] as one PNG grid, nrow per row, each image upscaled by `scale`
    (nearest neighbour, so 32x32 pixels stay visible). Returns the path."""
    path = Path(path)
    if scale > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(images.cpu(), path, nrow=nrow, padding=2, pad_value=1.0)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot write {path} ({error}); pass --out a writable .png path") from None
    return path


def grid_shape(num_images, nrow, height, width, scale=1, padding=2):
    """(height, width) in pixels of the grid save_grid writes: what make_grid produces."""
    rows = math.ceil(num_images / min(nrow, num_images))
    cols = min(nrow, num_images)
    return rows * (height * scale + padding) + padding, cols * (width * scale + padding) + padding


def interleave_rows(top, bottom, nrow):
    """Stack rows of `top` above the matching rows of `bottom` (both (N, ...)) for a grid of nrow columns."""
    blocks = []
    for start in range(0, len(top), nrow):
        blocks += [top[start:start + nrow], bottom[start:start + nrow]]
    return torch.cat(blocks)


def nearest_distances(images, reference_uint8, chunk=256):
    """For each image (N, 3, H, W) in [0, 1]: (RMSE to its nearest reference image, index of that image).

    RMSE is per pixel and channel on the 0-255 scale. reference_uint8: (M, 3, H, W) uint8.
    """
    queries = images.flatten(1).cpu().double() * 255
    best = torch.full((len(queries),), math.inf, dtype=torch.float64)
    best_index = torch.zeros(len(queries), dtype=torch.long)
    for start in range(0, len(reference_uint8), chunk):
        reference = reference_uint8[start:start + chunk].flatten(1).double()
        distances, index = torch.cdist(queries, reference).min(dim=1)
        better = distances < best
        best[better], best_index[better] = distances[better], index[better] + start
    return best / math.sqrt(queries.shape[1]), best_index


# ----------------------------------------------------------------------------------------- evaluation

def log_normal(z, mean, std):
    """log N(z; mean, std^2 I) summed over the last dimension (nats)."""
    return Normal(mean, std).log_prob(z).sum(dim=-1)


@torch.no_grad()
def importance_log_weights(model, x, num_samples, generator=None, eps=None, discretized=False):
    """log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x) for z_k = mean + std * eps_k, k = 1..K.

    x: (B, 3, H, W). eps: optional fixed noise (K, B, latent); else drawn from generator. Returns
    {"model": (log_weights (K, B), log p(x|z) (K, B))} in nats under the likelihood the model was trained
    with (a density for the Gaussians); with discretized=True also "discretized": the same pair under the
    8-bit discretized Gaussian, from the same decoded images. Decodes at most DECODE_CHUNK_IMAGES images at
    once, so K may be large at any resolution.
    """
    mean, log_var = model.encode(x)
    std = log_var.mul(0.5).exp()
    log_sigma = model.log_sigma()
    likelihoods = {"model": lambda targets, decoded: -reconstruction_nll(targets, decoded, model.likelihood,
                                                                         log_sigma)}
    if discretized:
        likelihoods["discretized"] = lambda targets, decoded: discretized_gaussian_log_likelihood(
            targets, decoded, log_sigma)
    per_chunk = max(1, DECODE_CHUNK_IMAGES // len(x))
    chunks = {name: ([], []) for name in likelihoods}
    for start in range(0, num_samples, per_chunk):
        k = min(per_chunk, num_samples - start)
        noise = eps[start:start + k] if eps is not None else \
            torch.randn(k, *mean.shape, generator=generator).to(mean.device)
        z = mean + std * noise  # (k, B, latent)
        decoded = model.decode(z.flatten(0, 1))
        targets = x.repeat(k, 1, 1, 1)
        # Summed in float64 on the CPU: log-weights of thousands of nats keep their small differences, and MPS
        # has no float64.
        log_prior = log_normal(z, torch.zeros_like(z), torch.ones_like(z)).cpu().double()
        # log q(z|x) from the noise itself: z - mean would cancel digits when std is far below |mean|.
        log_posterior = (log_normal(noise, torch.zeros_like(noise), torch.ones_like(noise))
                         - log_var.mul(0.5).sum(dim=-1)).cpu().double()
        for name, log_likelihood_of in likelihoods.items():
            log_likelihood = log_likelihood_of(targets, decoded).view(k, len(x)).cpu().double()
            chunks[name][0].append(log_likelihood + log_prior - log_posterior)
            chunks[name][1].append(log_likelihood)
    return {name: (torch.cat(weights), torch.cat(log_likelihoods))
            for name, (weights, log_likelihoods) in chunks.items()}


@torch.no_grad()
def evaluate_images(model, images_uint8, iw_samples=100, batch_size=64, generator=None, progress=True):
    """Honest held-out numbers for uint8 images (N, 3, H, W), per image, beta = 1. See EVALUATION_KEYS."""
    device = model_device(model)
    num_dims = images_uint8[0].numel()
    gaussian = model.likelihood in ("gaussian", "gaussian-learned")
    sums = {"kl": 0.0, "reconstruction": 0.0, "reconstruction_discrete": 0.0, "squared_error": 0.0}
    iwae, iwae_discrete, means, kl_dims = [], [], [], 0.0
    batches = range(0, len(images_uint8), batch_size)
    for start in tqdm(batches, desc=f"evaluating (K={iw_samples})", unit="batch", disable=not progress,
                      leave=False):
        x = to_float(images_uint8[start:start + batch_size].to(device))
        mean, log_var = model.encode(x)
        kl = kl_per_dimension(mean, log_var)
        kl_dims = kl_dims + kl.cpu().double().sum(dim=0)
        sums["kl"] += kl.sum().item()
        sums["squared_error"] += sum_squared_error(x, model.decode(mean)).sum().item()
        means.append(mean.cpu())
        # Both likelihoods see the same z and decoded images, so the two bounds differ only by the likelihood.
        noise = torch.randn(iw_samples, *mean.shape, generator=generator).to(device)
        weights = importance_log_weights(model, x, iw_samples, eps=noise, discretized=gaussian)
        log_weights, log_likelihood = weights["model"]
        iwae.append(iwae_log_likelihood(log_weights))
        sums["reconstruction"] -= log_likelihood.mean(dim=0).sum().item()
        if gaussian:
            log_weights, log_likelihood = weights["discretized"]
            iwae_discrete.append(iwae_log_likelihood(log_weights))
            sums["reconstruction_discrete"] -= log_likelihood.mean(dim=0).sum().item()
    count = len(images_uint8)
    means = torch.cat(means)
    nll = -torch.cat(iwae)
    results = {
        "num_images": count,
        "likelihood": model.likelihood,
        "decoder_sigma": None if model.log_sigma() is None else model.log_sigma().exp().item(),
        "neg_elbo_nats": (sums["kl"] + sums["reconstruction"]) / count,
        "kl_nats": sums["kl"] / count,
        "reconstruction_nats": sums["reconstruction"] / count,
        "iw_samples": iw_samples,
        "iwae_nll_nats": nll.mean().item(),
        "iwae_nll_stderr": standard_error(nll),
        "psnr_db": psnr_db(sums["squared_error"] / (count * num_dims)),
        "active_units": active_units(means),
        "latent_size": model.latent_size,
        "kl_per_dim": (kl_dims / count).tolist(),
        "posterior_mean_variance": posterior_variance(means).tolist(),
    }
    results.update(_bits_per_dim_results(iwae_discrete, sums["kl"] + sums["reconstruction_discrete"], count,
                                         num_dims, iw_samples, model.likelihood))
    return results


def _bits_per_dim_results(iwae_discrete, neg_elbo_discrete_sum, count, num_dims, iw_samples, likelihood):
    if not iwae_discrete:
        return {"bits_per_dim": None, "bits_per_dim_stderr": None, "neg_elbo_bits_per_dim": None,
                "bits_per_dim_note": f"the {likelihood} likelihood is not a normalized distribution over 8-bit "
                                     f"pixels (binary cross-entropy on non-binary data), so it has no bits/dim"}
    nll = -torch.cat(iwae_discrete)
    return {
        "bits_per_dim": bits_per_dim(nll.mean().item(), num_dims),
        "bits_per_dim_stderr": bits_per_dim(standard_error(nll), num_dims),
        "neg_elbo_bits_per_dim": bits_per_dim(neg_elbo_discrete_sum / count, num_dims),
        "bits_per_dim_note": f"IWAE bound with K={iw_samples} under the decoder's Gaussian discretized to 256 "
                             f"levels (bins of width 1/255, end bins to +-inf); D = {num_dims}; "
                             f"neg_elbo_bits_per_dim is the ELBO under the same discretized likelihood",
    }


def model_device(model):
    """The device the model's parameters are on."""
    return next(model.parameters()).device
