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

from datasets.batches import to_float
from datasets.decoding import load_image
from vae.checkpoint import load_checkpoint, restore_model
from vae.config import saved_config
from vae.device import model_device
from vae.errors import UserError
from vae.metrics import mean_pairwise_rmse, same_class_pairwise_rmse
from vae.fid import fid_kid, frechet_distance, inception_features, load_inception
from vae import diffusion_prior
from vae.samplers import SAMPLER_PREFERENCE, fit_gmm, fit_two_stage, gmm_vary, prior_state, sample_latents
from vae.vae import build_model, eval_mode, posterior, posterior_moments

# The shipped model (recipes/flowers32.json): the default --checkpoint of the scripts and the page.
PRETRAINED = Path(__file__).resolve().parent.parent / "pretrained" / "flowers32.pt"
GMM_COMPONENTS = 4
DIFFUSION_STEPS = 6000  # about 20 minutes on two CPU cores for the 8x8x8 latent of flowers32


# ------------------------------------------------------------------------------------------- loading

def load_model(checkpoint_path, device):
    """(model in eval mode on device, checkpoint dict). The checkpoint's config (a TrainConfig: saved_config)
    rebuilds the model; a run trained with --ema is used with its averaged weights."""
    checkpoint = load_checkpoint(checkpoint_path)
    key = "ema_model" if "ema_model" in checkpoint else "model"
    model = restore_model(build_model(saved_config(checkpoint["config"], checkpoint_path)), checkpoint,
                          checkpoint_path, key)
    return model.to(device).eval(), checkpoint


def load_images(paths, model, device, resize="squash"):
    """Image files (any size or format) preprocessed exactly as training did (resize: the checkpoint's), as floats
    (N, 3, H, W)."""
    for path in paths:
        if Path(path).is_dir():
            raise UserError(f"{path} is a folder, not an image; pass an image file")
        if not Path(path).is_file():
            raise UserError(f"image {path} does not exist")
    return to_float(torch.stack([load_image(path, model.image_resolution, resize=resize) for path in paths])).to(device)


# -------------------------------------------------------------------------------------- making images

def fit_samplers(model, images_uint8, kinds=("gmm",), seed=0, hflip=False, diffusion_steps=DIFFUSION_STEPS,
                 progress=False):
    """Latent samplers fitted to the training images' posteriors: {kind: state} (see vae.samplers).

    The GMM has GMM_COMPONENTS full-covariance components (fewer for tiny sets), fitted to the posterior means;
    the diffusion prior learns the aggregate posterior from draws of q(z|x) for `diffusion_steps` steps, of the
    images and, with hflip (a run that trained on mirrored images), of their mirror images too.
    """
    means, stds = posterior_moments(model, images_uint8)
    device = model_device(model)

    def diffusion():
        all_means, all_stds = means, stds
        if hflip:
            flipped = posterior_moments(model, images_uint8.flip(-1))
            all_means, all_stds = torch.cat([means, flipped[0]]), torch.cat([stds, flipped[1]])
        return diffusion_prior.fit_diffusion_prior(all_means, all_stds, model.latent_shape, steps=diffusion_steps,
                                                   seed=seed, device=device, progress=progress)

    fitters = {"gmm": lambda: fit_gmm(means, num_components=min(GMM_COMPONENTS, len(means)), seed=seed),
               "two-stage": lambda: fit_two_stage(means, seed=seed, progress=progress),
               "diffusion": diffusion}
    return {kind: fitters[kind]() for kind in kinds}


def best_sampler(checkpoint):
    """The best sampler the checkpoint has (SAMPLER_PREFERENCE): a fitted one when stored, else the prior."""
    stored = checkpoint.get("samplers") or {}
    return next(kind for kind in SAMPLER_PREFERENCE if kind == "prior" or kind in stored)


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
    reconstructions = reconstruct_in_batches(model, real_uint8, batch_size)
    results = fid_kid(real, inception_features(generated, extractor, batch_size))
    results["recon_fid"] = frechet_distance(real, inception_features(reconstructions, extractor, batch_size))
    return {**results, "fid_samples": num_samples, "fid_reference_images": len(real_uint8)}


@torch.no_grad()
def reconstruct(model, x):
    """Reconstructions decoded from the posterior mean (the deterministic, most likely code)."""
    return model.decode(posterior(model, x)[0])


# Variation modes, best first: how a photo's code z is moved to make new images of the same kind (see variations).
VARIATION_MODES = {
    "diffusion": "noise the photo's code part of the way and denoise it with the learned diffusion prior "
                 "(SDEdit): new flowers of the photo's kind",
    "gmm": "move the photo's code within its component of the fitted Gaussian mixture",
    "posterior": "draws z = mean + T * std * eps from the photo's own posterior, T = strength / (1 - strength): "
                 "the same flower with its pixels varied",
}
# The strength of the default mode: the one the README's sweep of diffusion variations settled on.
DEFAULT_STRENGTH = 0.35
MAX_POSTERIOR_TEMPERATURE = 100.0


def variation_mode(checkpoint, mode="auto"):
    """The mode to use: `mode` itself, or for "auto" the best one the checkpoint can run (diffusion and gmm need
    their sampler stored in it; posterior needs nothing)."""
    stored = checkpoint.get("samplers") or {}
    if mode == "auto":
        return next(name for name in VARIATION_MODES if name == "posterior" or name in stored)
    if mode not in VARIATION_MODES:
        raise UserError(f"unknown variation mode {mode!r}; choose one of {', '.join(VARIATION_MODES)}")
    if mode != "posterior" and mode not in stored:
        raise UserError(f"the checkpoint has no {mode} sampler, which --mode {mode} needs (it has: "
                        f"{', '.join(stored) or 'none'}); fit it with python vae_inference.py export "
                        f"--fit-samplers {mode} --data-dir DIR --out NEW.pt, or pick --mode posterior")
    return mode


@torch.no_grad()
def variations(model, x, num_variations, strength=DEFAULT_STRENGTH, generator=None, mode="auto", checkpoint=None):
    """num_variations new images from the code of each photo x (N, 3, H, W); returns (images (N * num_variations,
    3, H, W), photo by photo, their z, the photos' posterior means (N, *latent_shape)).

    strength in [0, 1] says how far from the photo they go: 0 decodes the photo's posterior mean (its
    reconstruction), 1 is as free as a new sample. The mode (VARIATION_MODES) says how; "diffusion" and "gmm"
    take their fitted sampler from the checkpoint's "samplers", and "auto" is the best one the checkpoint has
    (see variation_mode). Noise comes from `generator` (a CPU one unless given; None: seeded from torch's
    global generator).
    """
    if not 0 <= strength <= 1:
        raise UserError(f"the strength must be in [0, 1], got {strength}")
    mode = variation_mode(checkpoint or {}, mode)
    if generator is None:
        generator = torch.Generator().manual_seed(int(torch.randint(2 ** 62, ())))
    mean, std = posterior(model, x)
    repeated = lambda tensor: tensor.repeat_interleave(num_variations, dim=0).flatten(1)  # noqa: E731
    if mode == "posterior":
        temperature = MAX_POSTERIOR_TEMPERATURE if strength >= 1 else \
            min(strength / (1 - strength), MAX_POSTERIOR_TEMPERATURE)
        eps = torch.randn(repeated(mean).shape, generator=generator, device=generator.device).to(mean.device)
        z = repeated(mean) + temperature * repeated(std) * eps
    elif mode == "diffusion":  # the denoiser runs on the model's device, its noise drawn from the generator
        z = diffusion_prior.vary(checkpoint["samplers"]["diffusion"], repeated(mean), strength, generator)
    else:
        z = gmm_vary(checkpoint["samplers"]["gmm"], repeated(mean).to(generator.device), strength,
                     generator).to(mean.device)
    z = z.view(-1, *model.latent_shape)
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
def traverse(model, center, value_range, steps, dims=None):
    """One row per latent dimension d of dims (default all): decoded center + v * e_d for v from -range to +range.

    center: (*latent_shape) (a posterior mean, or zeros); a spatial latent's dimensions go channel by channel,
    then row by row. Returns images (len(dims) * steps, 3, H, W), row-major.
    """
    dims = list(range(model.latent_size)) if dims is None else list(dims)
    center = center.flatten()
    values = torch.linspace(-value_range, value_range, steps, device=center.device)
    z = center.repeat(len(dims), steps, 1)  # (rows, steps, latent)
    for row, d in enumerate(dims):
        z[row, :, d] = center[d] + values
    return model.decode(z.view(-1, *model.latent_shape))


def most_active_dims(checkpoint, latent_size, count):
    """The `count` latent dimensions with the largest KL in the checkpoint's last held-out evaluation, most active
    first (the ones whose sweep changes the image); the first `count` when it has none. count 0: all of them."""
    if count == 0 or count >= latent_size:
        return list(range(latent_size)), "every dimension"
    kl = (checkpoint.get("eval") or {}).get("kl_per_dim")
    if not kl or len(kl) != latent_size:
        return list(range(count)), f"the first {count} dimensions (the checkpoint has no evaluation to rank them by)"
    ranked = sorted(range(latent_size), key=lambda d: -kl[d])[:count]
    return ranked, f"the {count} dimensions of largest held-out KL ({kl[ranked[0]]:.2f} to {kl[ranked[-1]]:.2f} nats)"


READABLE_PIXELS = 96  # what an image should measure on screen to be seen without zooming


def readable_scale(image_resolution):
    """The integer upscale that shows an image of image_resolution at about READABLE_PIXELS (1 when larger)."""
    return max(1, round(READABLE_PIXELS / max(image_resolution)))


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


def variation_distances(images_uint8, varied, training_uint8):
    """How close variations stay to their photo and how far they are from the training images, averaged over
    the photos (RMSE per pixel, 0-255 scale): {"variation_rmse_to_input", "variation_rmse_to_nearest_training"}.
    varied: (N * K, 3, H, W) in [0, 1], the K variations of each of the N photos in turn. A variation nearer a
    training image than its own photo is would be a copy of the training set rather than a variation."""
    to_input, to_training = [], []
    for image, photo_variations in zip(images_uint8, varied.cpu().split(len(varied) // len(images_uint8))):
        to_input.append(((photo_variations - to_float(image[None])) * 255).pow(2).flatten(1).mean(dim=1).sqrt()
                        .mean().item())
        to_training.append(nearest_distances(photo_variations, training_uint8)[0].mean().item())
    return {"variation_rmse_to_input": sum(to_input) / len(to_input),
            "variation_rmse_to_nearest_training": sum(to_training) / len(to_training)}


@torch.no_grad()
def reconstruct_in_batches(model, images_uint8, batch_size=32):
    """reconstruct() of uint8 images, a batch at a time on the model's device; floats (N, 3, H, W) on the CPU."""
    device = model_device(model)
    return torch.cat([reconstruct(model, to_float(images_uint8[start:start + batch_size]).to(device)).cpu()
                      for start in range(0, len(images_uint8), batch_size)])


class VariationJudge:
    """Measures variations of held-out photos: do they keep their kind, and how much do they vary?

    Built once for a model, a set of photos (uint8, with their classes, 0 for unknown) and the training images
    (with theirs): the Inception features of the photos, of their reconstructions and of the training images, the
    species classifier, the real photos' spread and their distance to the training images are computed here, so
    that a sweep over strengths and modes pays for them once. judge() returns a dict of:

    - species_kept: the share of variations that a species classifier puts in their photo's species. The
      classifier is linear on Inception v3 features (vae.species), fitted on the training images' classes only;
      species_accuracy_real is its accuracy on the photos themselves (the ceiling), and
      species_kept_reconstructions on their reconstructions. None where the classes are unknown.
    - variation_diversity: the mean pooled RMSE between two variations of one photo (metrics.mean_pairwise_rmse,
      8x8 average pooling), divided by the same between two real photos of one species among the photos
      (same_species_pooled_rmse, over same_species_pairs pairs): 1 is as varied as real photos of a species,
      0 copies. None when no two photos share a species.
    - variation_fid: FID of all variations against the photos; variation_reconstruction_fid is the FID of the
      photos' reconstructions against them, the same measurement for images made with no variation at all.
    - the RMSE to the photo and to the nearest training image (variation_distances), beside the photos' own
      distance to the nearest training image (input_rmse_to_nearest_training): variations are not copies.
    """

    def __init__(self, model, images_uint8, classes, training_uint8, training_classes, batch_size=64):
        from vae.species import fit_species_classifier

        self.model, self.images, self.training = model, images_uint8, training_uint8
        self.classes, training_classes = torch.as_tensor(classes), torch.as_tensor(training_classes)
        self.batch_size = batch_size
        self.extractor = load_inception(model_device(model))
        self.real = inception_features(images_uint8, self.extractor, batch_size)
        self.reconstructions = inception_features(reconstruct_in_batches(model, images_uint8), self.extractor,
                                                  batch_size)
        known = training_classes > 0
        self.predict = None
        if (self.classes > 0).all() and len(training_classes[known].unique()) >= 2:
            self.predict = fit_species_classifier(
                inception_features(training_uint8[known], self.extractor, batch_size), training_classes[known].numpy())
        self.real_spread, self.pairs = same_class_pairwise_rmse(to_float(images_uint8), self.classes) \
            if (self.classes > 0).all() else (None, 0)
        self.input_to_training = sum(nearest_distances(to_float(images_uint8), training_uint8)[0].tolist()) / \
            len(images_uint8)

    def _species_share(self, features, classes):
        return None if self.predict is None else float((self.predict(features) == classes.numpy()).mean())

    @torch.no_grad()
    def judge(self, checkpoint, num_variations, strength, mode, generator):
        if num_variations < 2:
            raise ValueError(f"variations differ only between two or more, got {num_variations}")
        device = model_device(self.model)
        varied = torch.cat([variations(self.model, to_float(self.images[start:start + 16]).to(device),
                                       num_variations, strength, generator, mode, checkpoint)[0].cpu()
                            for start in range(0, len(self.images), 16)])
        varied_features = inception_features(varied, self.extractor, self.batch_size)
        per_photo = [mean_pairwise_rmse(group) for group in varied.split(num_variations)]
        spread = sum(per_photo) / len(per_photo)
        return {
            "variations": num_variations, "variation_mode": mode, "variation_strength": strength,
            "species_kept": self._species_share(varied_features, self.classes.repeat_interleave(num_variations)),
            "species_accuracy_real": self._species_share(self.real, self.classes),
            "species_kept_reconstructions": self._species_share(self.reconstructions, self.classes),
            "variation_diversity": spread / self.real_spread if self.real_spread else None,
            "variation_pooled_rmse": spread, "same_species_pooled_rmse": self.real_spread,
            "same_species_pairs": self.pairs,
            "variation_fid": frechet_distance(self.real, varied_features),
            "variation_reconstruction_fid": frechet_distance(self.real, self.reconstructions),
            "variation_fid_reference_images": len(self.images),
            **variation_distances(self.images, varied, self.training),
            "input_rmse_to_nearest_training": self.input_to_training,
        }
