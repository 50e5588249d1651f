"""Measuring a trained VAE: evaluate(), the one evaluation that training runs every epoch and vae_inference.py
evaluate runs on demand (held-out -ELBO, the IWAE bound, bits/dim, PSNR, active units); the quality of its samples
(FID, KID); and how its variations of held-out photos keep their kind and vary (VariationJudge), with the
distances that show they are not copies of the training images.

    metrics = evaluate(model, eval_batches, beta=config.beta, iw_samples=100)
"""

import math

import torch
from tqdm import tqdm

from datasets.batches import to_float
from vae import distributed
from vae.device import model_device, sum_dtype
from vae.errors import UserError
from vae.checkpoint import unwrap
from vae.losses import kl_per_dimension
from vae.metrics import active_units, bits_per_dim, iwae_log_likelihood, psnr_db
from vae.vae import eval_mode
from vae.fid import cached_inception_features, fid_kid, frechet_distance, inception_features, load_inception
from vae.inference import reconstruct, sample_images, samples_of_kind, variations
from vae.metrics import mean_pairwise_rmse, same_class_pairwise_rmse

# Decoded images held in memory at once while importance sampling: bounds memory for any K and resolution
# (4096 images of 64x64 are 200 MB in float32, about 1 GB with the float64 likelihood terms).
DECODE_CHUNK_IMAGES = 1024


# -------------------------------------------------------------------------- the likelihood measures

def _log_normal(z):
    """log N(z; 0, I) summed over every dimension but the first two (K, B) (nats)."""
    return -0.5 * (z.pow(2) + math.log(2 * math.pi)).flatten(2).sum(dim=2)


def importance_samples(model, x, mean, log_var, iw_samples, generator=None, discretized=False):
    """K = iw_samples draws z_k = mean + std * noise_k per image: a dict of tensors in nats: "trained_term" (B,)
    the reconstruction term training minimises, for the first draw only, and (K, B) in float64
    "log_likelihood" log p(x|z_k) under the model's likelihood (a density for the Gaussians),
    "log_weight" log p(x|z_k) + log p(z_k) - log q(z_k|x), and with discretized=True the same two under the
    likelihood of the 8-bit pixels ("log_likelihood_8bit", "log_weight_8bit"), from the same decoded images.
    The noise is drawn from `generator` and decoded DECODE_CHUNK_IMAGES images at a time, so the memory needed
    does not grow with K, at any resolution.
    """
    std = log_var.mul(0.5).exp()
    names = ["log_likelihood", "log_weight"] + (["log_likelihood_8bit", "log_weight_8bit"] if discretized else [])
    # Filled chunk by chunk: allocated once, before the decoded images, so that no small result stays between the
    # large freed blocks of each chunk (glibc's heap would keep them, and grow by gigabytes over many chunks).
    results = {name: torch.empty(iw_samples, len(x), dtype=torch.float64) for name in names}
    per_chunk = max(1, DECODE_CHUNK_IMAGES // len(x))
    for start in range(0, iw_samples, per_chunk):
        k = min(per_chunk, iw_samples - start)
        eps = torch.randn(k, *mean.shape, generator=generator).to(mean.device)
        z = mean + std * eps
        parameters = model.decode_parameters(z.flatten(0, 1))
        targets = x.repeat(k, *[1] * (x.dim() - 1))
        # In float64 on the CPU: log-weights of thousands of nats keep their small differences, and MPS has none.
        log_prior = _log_normal(z).cpu().double()
        # log q(z|x) from the noise itself: z - mean would cancel digits when std is far below |mean|.
        log_posterior = (_log_normal(eps) - log_var.mul(0.5).flatten(1).sum(dim=1)).cpu().double()
        log_likelihood, log_likelihood_8bit = model.likelihood.log_likelihoods(targets, parameters, discretized)
        if start == 0:  # the trained term of the first draw only: all the training objective needs
            # Computed for the chunk's draws and cut after: only the likelihood may index its parameters.
            trained_term = model.likelihood.loss(targets, parameters)[:len(x)]
        for suffix, values in [("", log_likelihood)] + ([("_8bit", log_likelihood_8bit)] if discretized else []):
            values = values.view(k, len(x)).cpu().double()
            results["log_likelihood" + suffix][start:start + k] = values
            results["log_weight" + suffix][start:start + k] = values + log_prior - log_posterior
    return {"trained_term": trained_term, **results}


def image_measures(model, x, iw_samples, generator, beta, discretized):
    """What evaluate() measures on each image: a dict of per-image values, (B,) or (B, latent size), in nats
    unless a name says otherwise. evaluate() reports the mean of each over the evaluation images under the same
    name, and keeps the sums of squares for standard errors and variances: a new measurement is one entry here.
    """
    mean, log_var = model.encode(x)
    samples = importance_samples(model, x, mean, log_var, iw_samples, generator, discretized)
    kl = kl_per_dimension(mean, log_var).flatten(1)
    measures = {
        "kl_nats": kl.sum(dim=1),
        # -log p(x|z) under the model's likelihood, averaged over the K draws z ~ q(z|x).
        "reconstruction_nats": -samples["log_likelihood"].mean(dim=0),
        "iwae_nll_nats": -iwae_log_likelihood(samples["log_weight"]),
        # Of the reconstruction decoded from the posterior mean, for the PSNR.
        "mean_squared_error": (model.decode(mean) - x).pow(2).flatten(1).mean(dim=1),
        "posterior_std": log_var.mul(0.5).exp().flatten(1).mean(dim=1),
        "kl_per_dim": kl,
        "posterior_mean": mean.flatten(1),  # per dimension; its variance over images counts the active units
    }
    if beta is not None:  # the training objective on these images (the trained term of the first draw, no free bits)
        measures["loss"] = beta * measures["kl_nats"] + samples["trained_term"]
    if discretized:
        measures["reconstruction_8bit_nats"] = -samples["log_likelihood_8bit"].mean(dim=0)
        measures["iwae_nll_8bit_nats"] = -iwae_log_likelihood(samples["log_weight_8bit"])
    return measures


class Sums:
    """Per-measure sums and sums of squares over images, kept on the device (in `dtype`) and reduced across
    processes."""

    def __init__(self, dtype, device):
        self.dtype, self.device = dtype, device
        self.count, self.sums, self.squares = 0, {}, {}

    def add(self, measures):
        for name, values in measures.items():
            values = values.to(device=self.device, dtype=self.dtype)
            self.sums[name] = self.sums.get(name, 0) + values.sum(dim=0)
            self.squares[name] = self.squares.get(name, 0) + values.pow(2).sum(dim=0)
        self.count += len(next(iter(measures.values())))

    def reduce(self):
        """Every process's sums added up (in one call, the names in a fixed order): (count, means, standard errors
        of the mean, sample variances), each a dict of float64 CPU tensors by measure name."""
        names = sorted(self.sums)
        tensors = [self.sums[name] for name in names] + [self.squares[name] for name in names]
        flat = torch.cat([torch.tensor([float(self.count)], dtype=self.dtype, device=self.device),
                          *(tensor.reshape(-1) for tensor in tensors)])
        flat = distributed.all_reduce_sum(flat).double().cpu()
        count = int(flat[0])
        parts = [part.view(tensor.shape) for part, tensor in zip(flat[1:].split([t.numel() for t in tensors]), tensors)]
        totals, squares = dict(zip(names, parts[:len(names)])), dict(zip(names, parts[len(names):]))
        if count == 0:
            return 0, {}, {}, {}
        means = {name: total / count for name, total in totals.items()}
        variances = {name: (squares[name] - totals[name].pow(2) / count).clamp(min=0) / max(count - 1, 1)
                     for name in names}
        errors = {name: (variance / count).sqrt() if count > 1 else torch.zeros_like(variance)
                  for name, variance in variances.items()}
        return count, means, errors, variances


@torch.no_grad()
def evaluate(model, batches, beta=None, iw_samples=1, generator=None, progress=False):
    """Held-out measurements under model.eval() and no_grad, per image; nats unless a name says otherwise.

    batches: an ImageBatches over the evaluation images (in order, not shuffled). beta = 1 throughout:
    neg_elbo_nats = kl_nats + reconstruction_nats (-log p(x|z) under the model's likelihood, averaged over the
    iw_samples draws z ~ q(z|x)); iwae_nll_nats is the importance-weighted bound with K = iw_samples (the
    single-sample ELBO for K = 1); bits_per_dim scores the 8-bit pixels (discretized likelihood, IWAE bound).
    psnr_db compares reconstructions decoded from the posterior mean; active_units, kl_per_dim and
    posterior_std diagnose posterior collapse. With beta, loss = beta * KL + the trained reconstruction term
    (no free bits), the training objective on these images. Noise comes from `generator` (a fixed seed makes
    the numbers reproducible; None: torch's global generator). Under torchrun each process evaluates its
    shard and the sums are reduced. The per-image measurements are `image_measures`.
    """
    model = unwrap(model)
    device = model_device(model)
    likelihood = model.likelihood
    discretized = likelihood.no_bits_per_dim is None
    sums = Sums(sum_dtype(device), device)
    with eval_mode(model):
        for x in tqdm(batches.epoch(0), total=len(batches), desc=f"evaluating (K={iw_samples})", unit="batch",
                      leave=False, disable=not progress):
            sums.add(image_measures(model, x, iw_samples, generator, beta, discretized))
    count, mean, error, variance = sums.reduce()
    if count == 0:
        raise UserError("the evaluation set is empty; use a larger --holdout or --eval-size, or --eval-split none")
    num_dims = batches.images[0].numel()
    scalar = {name: value.item() for name, value in mean.items() if value.dim() == 0}
    metrics = {
        "num_images": count, "likelihood": likelihood.name, "decoder_sigma": likelihood.shared_sigma(),
        "iw_samples": iw_samples, "latent_size": model.latent_size,
        # Every measurement's mean, under its own name: per-dimension ones as lists.
        **{name: scalar[name] if name in scalar else value.tolist() for name, value in mean.items()},
        "neg_elbo_nats": scalar["kl_nats"] + scalar["reconstruction_nats"],
        "iwae_nll_stderr": error["iwae_nll_nats"].item(),
        "psnr_db": psnr_db(scalar["mean_squared_error"]),
        "active_units": active_units(variance["posterior_mean"]),
        "posterior_mean_variance": variance["posterior_mean"].tolist(),
    }
    if discretized:
        metrics.update({
            "bits_per_dim": bits_per_dim(scalar["iwae_nll_8bit_nats"], num_dims),
            "bits_per_dim_stderr": bits_per_dim(error["iwae_nll_8bit_nats"].item(), num_dims),
            "neg_elbo_bits_per_dim": bits_per_dim(scalar["kl_nats"] + scalar["reconstruction_8bit_nats"], num_dims),
            "bits_per_dim_note": f"IWAE bound with K={iw_samples} under the decoder's "
                                 f"{likelihood.discretized} discretized to 256 "
                                 f"levels (bins of width 1/255, end bins to +-inf); D = {num_dims}; "
                                 f"neg_elbo_bits_per_dim is the ELBO under the same discretized likelihood",
        })
    else:
        metrics.update({
            "bits_per_dim": None, "bits_per_dim_stderr": None, "neg_elbo_bits_per_dim": None,
            "bits_per_dim_note": likelihood.no_bits_per_dim.format(name=likelihood.name)})
    return metrics


# -------------------------------------------------------------------- samples and variations

@torch.no_grad()
def sample_quality(model, sampler, real_uint8, num_samples, temperature, generator, device, batch_size=64):
    """FID and KID (Heusel et al. 2017; Binkowski et al. 2018) of num_samples images drawn from `sampler` against
    the real images, and recon_fid, the FID of the real images' reconstructions: how far the model is from the
    data before any sampling. Inception v3 pool features at 299x299 (see vae.fid)."""
    extractor = load_inception(device)  # features are computed on its device
    real = inception_features(real_uint8, extractor, batch_size)
    generated = torch.cat([sample_images(model, sampler, min(batch_size, num_samples - start), temperature,
                                         generator)[0].cpu() for start in range(0, num_samples, batch_size)])
    reconstructions = reconstruct_in_batches(model, real_uint8, batch_size)
    results = fid_kid(real, inception_features(generated, extractor, batch_size))
    results["recon_fid"] = frechet_distance(real, inception_features(reconstructions, extractor, batch_size))
    return {**results, "fid_samples": num_samples, "fid_reference_images": len(real_uint8)}


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
        self.real = cached_inception_features(images_uint8, self.extractor, batch_size)
        self.reconstructions = inception_features(reconstruct_in_batches(model, images_uint8), self.extractor,
                                                  batch_size)
        known = training_classes > 0
        self.predict = None
        if (self.classes > 0).all() and len(training_classes[known].unique()) >= 2:
            self.predict = fit_species_classifier(
                cached_inception_features(training_uint8[known], self.extractor, batch_size),
                training_classes[known].numpy())
        self.real_spread, self.pairs = same_class_pairwise_rmse(to_float(images_uint8), self.classes) \
            if (self.classes > 0).all() else (None, 0)
        self.input_to_training = sum(nearest_distances(to_float(images_uint8), training_uint8)[0].tolist()) / \
            len(images_uint8)

    def _species_share(self, features, classes):
        return None if self.predict is None else float((self.predict(features) == classes.numpy()).mean())

    @torch.no_grad()
    def judge(self, samplers, num_variations, strength, mode, generator):
        if num_variations < 2:
            raise ValueError(f"variations differ only between two or more, got {num_variations}")
        device = model_device(self.model)
        varied = torch.cat([variations(self.model, to_float(self.images[start:start + 16]).to(device),
                                       num_variations, strength, generator, mode, samplers)[0].cpu()
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

    @torch.no_grad()
    def class_samples(self, kind, per_class, generator):
        """`sample --class N` measured: per_class samples of the kind sampler from each training class's mean code,
        and the share that the species classifier puts in that class (class_samples_kept; chance is one over the
        number of classes), beside its accuracy on the real photos (species_accuracy_real, the ceiling)."""
        classes = kind.state["classes"]
        if self.predict is None or not classes:
            raise UserError("measuring class samples needs Flowers102 labels for the photos and a kind sampler "
                            "fitted on labelled photos")
        images = torch.cat([samples_of_kind(self.model, kind, kind.class_code(label), per_class, 1.0,
                                            generator)[0].cpu() for label in classes])
        labels = torch.tensor(classes).repeat_interleave(per_class)
        return {"class_samples_per_class": per_class, "classes": len(classes),
                "class_samples_kept": self._species_share(inception_features(images, self.extractor,
                                                                             self.batch_size), labels),
                "species_accuracy_real": self._species_share(self.real, self.classes)}
