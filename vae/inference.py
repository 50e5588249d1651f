"""What vae_inference.py does, as functions: load a trained VAE and make images with it. (Its measurements
are vae.training.evaluate, the evaluation training runs every epoch.)

Images are float tensors in [0, 1] of shape (N, 3, H, W); latents are (N, *model.latent_shape): (N, D) for a
dense latent, (N, C, H, W) for a spatial one. Every function that draws noise takes a torch.Generator, so a
--seed reproduces its output exactly.
"""

import math
from pathlib import Path

import torch
from torchvision.utils import save_image

from datasets.preprocessing import holdout_split, load_image, split_images, to_float
from vae.checkpoint import load_checkpoint, restore_model
from vae.device import model_device
from vae.errors import UserError
from vae.fid import fid_kid, frechet_distance, inception_features, load_inception
from vae.samplers import fit_gmm, fit_two_stage, prior_state, sample_latents
from vae.vae import build_model, eval_mode

GMM_COMPONENTS = 4


# ------------------------------------------------------------------------------------------- loading

def load_model(checkpoint_path, device):
    """(model in eval mode on device, checkpoint dict). The checkpoint's config rebuilds the model; a run trained
    with --ema is used with its averaged weights."""
    checkpoint = load_checkpoint(checkpoint_path)
    key = "ema_model" if "ema_model" in checkpoint else "model"
    model = restore_model(build_model(checkpoint["config"]), checkpoint, checkpoint_path, key)
    return model.to(device).eval(), checkpoint


def load_images(paths, model, device):
    """Image files (any size or format) preprocessed exactly as training did, as floats (N, 3, H, W)."""
    for path in paths:
        if Path(path).is_dir():
            raise UserError(f"{path} is a folder, not an image; pass an image file")
        if not Path(path).is_file():
            raise UserError(f"image {path} does not exist")
    return to_float(torch.stack([load_image(path, model.image_resolution) for path in paths])).to(device)


def dataset_images(data_dir, split, resolution, subset="all", holdout=0.0, holdout_seed=0, cache_dir="",
                   num_workers=1, skip_bad_images=False):
    """(uint8 images (N, 3, R, R), their file names) of a Flowers102 split (or +-joined splits).

    subset "all" is the whole split; with holdout > 0, "held-out" is exactly the images a training run with
    --holdout HOLDOUT --seed HOLDOUT_SEED evaluated on, and "train" the ones it trained on.
    """
    images, names = split_images(data_dir, split, resolution, cache_dir, num_workers, skip_bad_images)
    if subset == "all" or holdout == 0:
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
def posterior_means(model, images_uint8, batch_size=256):
    """The posterior means E[z|x] of uint8 images, flattened to (N, latent_size), on the CPU. Encoded in eval
    mode (BatchNorm's running statistics, which it leaves as they were), whatever mode the model is in."""
    device = model_device(model)
    with eval_mode(model):
        return torch.cat([model.encode(to_float(images_uint8[start:start + batch_size].to(device)))[0].flatten(1)
                          .cpu() for start in range(0, len(images_uint8), batch_size)])


def fit_samplers(model, images_uint8, kinds=("gmm",), seed=0):
    """Latent samplers fitted to the posterior means of the training images: {kind: state} (see vae.samplers).
    The GMM has GMM_COMPONENTS full-covariance components (fewer for tiny sets)."""
    latents = posterior_means(model, images_uint8)
    fitters = {"gmm": lambda: fit_gmm(latents, num_components=min(GMM_COMPONENTS, len(latents)), seed=seed),
               "two-stage": lambda: fit_two_stage(latents, seed=seed)}
    return {kind: fitters[kind]() for kind in kinds}


def sampler_state(model, checkpoint, kind, path):
    """The state of the sampler `kind`: the prior, or one fitted and stored in the checkpoint."""
    if kind == "prior":
        return prior_state(model.latent_size)
    stored = checkpoint.get("samplers") or {}
    if kind not in stored:
        raise UserError(f"{path} has no {kind} sampler (it has: {', '.join(['prior', *stored])}); fit one with "
                        f"python vae_inference.py export --checkpoint {path} --fit-samplers --data-dir DIR "
                        f"--out NEW.pt")
    return stored[kind]


@torch.no_grad()
def sample_images(model, state, num_images, temperature, generator):
    """num_images decoded draws from a latent sampler (prior: z ~ N(0, T^2 I)); returns (images, z)."""
    z = sample_latents(state, num_images, temperature, generator).view(num_images, *model.latent_shape)
    z = z.to(model_device(model))
    return model.decode(z), z


@torch.no_grad()
def sample_quality(model, state, real_uint8, num_samples, temperature, generator, device, batch_size=64):
    """FID and KID (Heusel et al. 2017; Binkowski et al. 2018) of num_samples generated images against the real
    images, and recon_fid, the FID of the real images' reconstructions: how far the model is from the data
    before any sampling. Inception v3 pool features at 299x299 (see vae.fid)."""
    extractor = load_inception(device)  # features are computed on its device
    real = inception_features(real_uint8, extractor, batch_size)
    generated = torch.cat([sample_images(model, state, min(batch_size, num_samples - start), temperature,
                                         generator)[0].cpu() for start in range(0, num_samples, batch_size)])
    reconstructions = torch.cat([reconstruct(model, to_float(real_uint8[start:start + batch_size]).to(
        model_device(model))).cpu() for start in range(0, len(real_uint8), batch_size)])
    results = fid_kid(real, inception_features(generated, extractor, batch_size))
    results["recon_fid"] = frechet_distance(real, inception_features(reconstructions, extractor, batch_size))
    return {**results, "fid_samples": num_samples, "fid_reference_images": len(real_uint8)}


@torch.no_grad()
def reconstruct(model, x):
    """Reconstructions decoded from the posterior mean (the deterministic, most likely code)."""
    return model.decode(posterior(model, x)[0])


@torch.no_grad()
def variations(model, x, num_variations, temperature, generator):
    """Decoded draws z = mean + temperature * std * eps around the posterior of one image x (1, 3, H, W).

    Every latent dimension moves by its own posterior std, scaled by the temperature: for a spatial latent that
    is every position of every channel, so the variations keep the photo's layout and vary its detail where
    the encoder is unsure. Returns (images (num_variations, 3, H, W), z, posterior mean (1, *latent_shape)).
    """
    mean, std = posterior(model, x)
    eps = torch.randn(num_variations, *model.latent_shape, generator=generator).to(mean.device)
    z = mean + temperature * std * eps
    return model.decode(z), z, mean


def lerp(a, b, t):
    return (1 - t) * a + t * b


def slerp(a, b, t):
    """Spherical interpolation of two vectors (White 2016): keeps the norm typical of Gaussian draws,
    which the straight line through the origin's low-density region does not. Falls back to lerp for
    (anti)parallel vectors, where the great circle is undefined. A spatial latent is one long vector here."""
    shape, a, b = a.shape, a.flatten(), b.flatten()
    cos_angle = torch.dot(a, b) / (a.norm() * b.norm()).clamp(min=1e-12)
    angle = torch.arccos(cos_angle.clamp(-1.0, 1.0))
    if torch.sin(angle).abs() < 1e-6:
        return lerp(a, b, t).view(shape)
    return ((torch.sin((1 - t) * angle) * a + torch.sin(t * angle) * b) / torch.sin(angle)).view(shape)


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

    center: (*latent_shape) (a posterior mean, or zeros); a spatial latent's dimensions go channel by channel,
    then row by row. Returns images (latent_size * steps, 3, H, W), row-major.
    """
    center = center.flatten()
    values = torch.linspace(-value_range, value_range, steps, device=center.device)
    z = center.repeat(model.latent_size, steps, 1)  # (latent, steps, latent)
    for d in range(model.latent_size):
        z[d, :, d] = center[d] + values
    return model.decode(z.view(-1, *model.latent_shape))


def enlarge(images, scale):
    """Images (N, 3, H, W) upscaled by the integer `scale` with nearest neighbour, so each model pixel stays a
    visible square."""
    return images if scale == 1 else torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest")


def save_grid(images, path, nrow, scale=1):
    """Write images (N, 3, H, W) in [0, 1] as one PNG grid, nrow per row, each image upscaled by `scale`
    (nearest neighbour, so 32x32 pixels stay visible). Returns the path."""
    path = Path(path)
    images = enlarge(images, scale)
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


@torch.no_grad()
def variation_distances(model, images_uint8, training_uint8, num_variations, temperature, generator):
    """How close variations stay to their photo and how far they are from the training images, averaged over
    the photos (RMSE per pixel, 0-255 scale): {"variation_rmse_to_input", "variation_rmse_to_nearest_training",
    "input_rmse_to_nearest_training"}. A variation nearer a training image than its own photo is would be a
    copy of the training set rather than a variation."""
    device = model_device(model)
    to_input, to_training, input_to_training = [], [], []
    for image in images_uint8:
        x = to_float(image[None]).to(device)
        varied = variations(model, x, num_variations, temperature, generator)[0]
        to_input.append(((varied - x) * 255).pow(2).flatten(1).mean(dim=1).sqrt().mean().item())
        to_training.append(nearest_distances(varied, training_uint8)[0].mean().item())
        input_to_training.append(nearest_distances(x, training_uint8)[0].item())
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    return {"variations": num_variations, "variation_temperature": temperature,
            "variation_rmse_to_input": mean(to_input), "variation_rmse_to_nearest_training": mean(to_training),
            "input_rmse_to_nearest_training": mean(input_to_training)}
