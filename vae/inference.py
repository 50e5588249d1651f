"""Making images with a trained VAE, as functions: samples, reconstructions, variations of a photo, interpolation,
traversals, and the grids they are saved as. (Loading a checkpoint is vae/trained.py; measuring is
vae/evaluation.py.)

Images are float tensors in [0, 1] of shape (N, 3, H, W); latents are (N, *model.latent_shape): (N, D) for a
dense latent, (N, C, H, W) for a spatial one. Every function that draws noise takes a torch.Generator, so a
seed reproduces its output exactly.
"""

from pathlib import Path

import torch
from torchvision.utils import save_image
from tqdm import tqdm

from datasets.batches import to_float
from datasets.decoding import load_image
from vae.device import model_device
from vae.errors import MissingSampler, UserError
from vae.files import replace_atomically, write_failure
from vae.samplers import SAMPLERS, ranked
from vae.vae import posterior_mean_std


def load_images(paths, model, device, resize="squash"):
    """Image files (any size or format) preprocessed exactly as training did (resize: the checkpoint's), as floats
    (N, 3, H, W)."""
    for path in paths:
        if Path(path).is_dir():
            raise UserError(f"{path} is a folder, not an image; pass an image file")
        if not Path(path).is_file():
            raise UserError(f"image {path} does not exist")
    return to_float(torch.stack([load_image(path, model.image_resolution, resize=resize) for path in paths])).to(device)


# Images made (drawn and decoded) at once: whatever a command's count, its memory is that of one chunk.
CHUNK = 256
# The most pixels a grid may have (a 6,300-pixel square; about 2 GB at its peak, as the float tensors torchvision
# builds it from): larger ones are refused at the start of a command, with the flags that shrink them.
MAX_GRID_PIXELS = 40_000_000


def in_chunks(total, make, what="images"):
    """make(start, count) over chunks of CHUNK items, concatenated (element-wise when make returns tuples), with a
    progress bar when there is more than one chunk."""
    starts = range(0, total, CHUNK)
    parts = [make(start, min(CHUNK, total - start))
             for start in tqdm(starts, desc=what, unit="chunk", disable=len(starts) < 2, leave=False)]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(part) for part in zip(*parts))
    return torch.cat(parts)


@torch.no_grad()
def decode(model, z):
    """model.decode of latents z (N, *latent_shape), CHUNK at a time."""
    return in_chunks(len(z), lambda start, count: model.decode(z[start:start + count]), "decoding")


def check_grid_size(count, image_resolution, scale):
    """Refuse, before any work, a grid of `count` images of image_resolution (H, W) enlarged `scale` times that
    would exceed MAX_GRID_PIXELS."""
    height, width = image_resolution
    pixels = count * height * width * scale ** 2
    if pixels > MAX_GRID_PIXELS:
        raise UserError(f"the grid would hold {count} images of {height * scale}x{width * scale} pixels "
                        f"({pixels / 1e6:,.0f} megapixels, more than the {MAX_GRID_PIXELS / 1e6:.0f} a grid may have); "
                        f"lower the count (--num, --steps, --dims) or --scale")


@torch.no_grad()
def sample_images(model, sampler, num_images, temperature, generator):
    """num_images decoded draws from a latent sampler (a vae.samplers.Sampler); returns (images, z)."""
    def draw(start, count):
        z = sampler.sample(count, temperature, generator).view(count, *model.latent_shape).to(model_device(model))
        return model.decode(z), z

    return in_chunks(num_images, draw, "sampling")


@torch.no_grad()
def kind_codes(model, kind, x):
    """The codes (N, code_size) of the kind sampler `kind` (vae.kind_prior.KindPrior) for photos x (N, 3, H, W)."""
    return kind.codes(posterior_mean_std(model, x)[0].flatten(1))


@torch.no_grad()
def samples_of_kind(model, kind, code, num_images, temperature, generator):
    """num_images decoded draws of the kind sampler given one code (1, code_size): new flowers of that kind
    (sample --like, --class). Returns (images, z)."""
    def draw(start, count):
        z = kind.sample_given(code.expand(count, -1), generator, temperature).view(count, *model.latent_shape)
        z = z.to(model_device(model))
        return model.decode(z), z

    return in_chunks(num_images, draw, "sampling")


@torch.no_grad()
def reconstruct(model, x):
    """Reconstructions decoded from the posterior mean (the deterministic, most likely code)."""
    return model.decode(posterior_mean_std(model, x)[0])


# ------------------------------------------------------------------------------------------- variations

# The mode every model can run: it needs no sampler, only the photo's own posterior.
POSTERIOR_MODE = "posterior"
POSTERIOR_DESCRIPTION = ("draws z = mean + T * std * eps from the photo's own posterior, T = strength / "
                         "(1 - strength): the same flower with its pixels varied")
# The default strength: where the README's sweep finds the default mode's (kind) variations varied (diversity
# above 0.5) and keeping the species most often.
DEFAULT_STRENGTH = 0.2
MAX_POSTERIOR_TEMPERATURE = 100.0


def variation_modes(samplers=None):
    """{mode: description}, best first: the samplers that can vary a photo (of `samplers`, a checkpoint's, or every
    registered one), then the posterior mode."""
    names = [name for name in ranked(SAMPLERS if samplers is None else samplers) if SAMPLERS[name].can_vary()]
    return {**{name: SAMPLERS[name].description for name in names}, POSTERIOR_MODE: POSTERIOR_DESCRIPTION}


def variation_mode(samplers, mode="auto", path="the checkpoint"):
    """The mode to use: `mode` itself, or for "auto" the best one the samplers (a checkpoint's) can run."""
    available = variation_modes(samplers)
    if mode == "auto":
        return next(iter(available))
    if mode not in variation_modes():
        raise UserError(f"unknown variation mode {mode!r}; choose one of {', '.join(variation_modes())}")
    if mode not in available:
        raise MissingSampler(f"{path} has no {mode} sampler, which {mode} variations need (it has: "
                             f"{', '.join(ranked(samplers))})", mode, path)
    return mode


@torch.no_grad()
def variations(model, x, num_variations, strength=DEFAULT_STRENGTH, generator=None, mode="auto", samplers=None):
    """num_variations new images from the code of each photo x (N, 3, H, W); returns (images (N * num_variations,
    3, H, W), photo by photo, their z, the photos' posterior means (N, *latent_shape)).

    strength in [0, 1] says how far from the photo they go: 0 decodes the photo's posterior mean (its
    reconstruction), 1 is as free as a new sample. The mode (variation_modes) says how: a sampler of `samplers`
    (a checkpoint's, {name: Sampler}) that can vary a photo, or the posterior mode; "auto" is the best one they
    allow. Noise comes from `generator` (a CPU one unless given; None: seeded from torch's global generator).
    """
    if not 0 <= strength <= 1:
        raise UserError(f"the strength must be in [0, 1], got {strength}")
    samplers = samplers or {}
    mode = variation_mode(samplers, mode)
    if generator is None:
        generator = torch.Generator().manual_seed(int(torch.randint(2 ** 62, ())))
    mean, std = posterior_mean_std(model, x)
    means, stds = (tensor.repeat_interleave(num_variations, dim=0).flatten(1) for tensor in (mean, std))

    def vary(start, count):
        centre, spread = means[start:start + count], stds[start:start + count]
        if mode == POSTERIOR_MODE:
            temperature = MAX_POSTERIOR_TEMPERATURE if strength >= 1 else \
                min(strength / (1 - strength), MAX_POSTERIOR_TEMPERATURE)
            eps = torch.randn(centre.shape, generator=generator, device=generator.device).to(centre.device)
            z = centre + temperature * spread * eps
        else:  # on the model's device, its noise drawn from the generator
            z = samplers[mode].vary(centre, strength, generator).to(centre.device)
        z = z.view(-1, *model.latent_shape)
        return model.decode(z), z

    images, z = in_chunks(len(means), vary, "variations")
    return images, z, mean


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
    mean_a, mean_b = posterior_mean_std(model, x_a)[0][0], posterior_mean_std(model, x_b)[0][0]
    path = slerp if spherical else lerp
    z = torch.stack([path(mean_a, mean_b, t) for t in torch.linspace(0, 1, steps).tolist()])
    return decode(model, z)


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
    return decode(model, z.view(-1, *model.latent_shape))


@torch.no_grad()
def walk_code(model, kind, code, value_range, steps, rows, generator):
    """A traversal of the kind sampler's code around `code` (1, code_size): one row per principal direction of the
    training codes (rows of them), each from -value_range to +value_range of their spread along it, all drawn
    from the same noise. Returns images (rows * steps, 3, H, W)."""
    z = kind.walk(code, rows, value_range, steps, generator)
    return decode(model, z.view(-1, *model.latent_shape).to(model_device(model)))


@torch.no_grad()
def interpolate_codes(model, kind, x_a, x_b, steps):
    """Decoded points between two photos (1, 3, H, W) through the kind sampler: their codes and their noises (found
    by DDIM inversion) walked together, endpoints included. Returns images (steps, 3, H, W)."""
    mean_a, mean_b = posterior_mean_std(model, x_a)[0], posterior_mean_std(model, x_b)[0]
    z = kind.interpolate(mean_a.flatten(1), mean_b.flatten(1), steps)
    return decode(model, z.view(-1, *model.latent_shape))


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
    (nearest neighbour, so 32x32 pixels stay visible). Written to a temporary file beside it, then renamed, so a
    failed write leaves a file it replaces whole. Returns the path."""
    path = Path(path)
    images = enlarge(images, scale).cpu()
    try:
        replace_atomically(path, lambda temporary: save_image(images, temporary, nrow=nrow, padding=2, pad_value=1.0,
                                                              format="png"))
    except OSError as error:
        raise UserError(f"{write_failure(error, path)}; nothing was written there. Free some disk space, or pass "
                        f"another .png path") from None
    except ValueError as error:
        raise UserError(f"cannot write {path} ({error}); write it to a .png path") from None
    return path


def interleave_rows(top, bottom, nrow):
    """Stack rows of `top` above the matching rows of `bottom` (both (N, ...)) for a grid of nrow columns."""
    blocks = []
    for start in range(0, len(top), nrow):
        blocks += [top[start:start + nrow], bottom[start:start + nrow]]
    return torch.cat(blocks)
