"""Samplers of the latent space for generation: where to draw z from before decoding.

A VAE's aggregate posterior q(z) = E_x q(z|x) rarely matches its prior N(0, I): there are holes where the
prior puts mass but no image's posterior does, and decoding from them gives the blurry or odd samples that
make prior samples look worse than reconstructions. An "ex-post" density fitted to the training images'
latents fixes much of this (Ghosh et al. 2020 fit a GMM; Dai & Wipf 2019 fit a second VAE).

Every sampler works on flattened latents (N, D): a spatial latent (C, H, W) is flattened by the caller, and
samples are reshaped back. A sampler's state is a plain dict of tensors, ints, floats and strings, so it
saves inside a checkpoint that loads with torch.load(weights_only=True), and sampling needs no data and
no scikit-learn:

    "prior"      N(0, T^2 I), the VAE's own prior                   prior_state(latent_dim)
    "gmm"        a Gaussian mixture (Ghosh et al. 2020)              fit_gmm(latents, ...)
    "two-stage"  a second, small VAE on the latents (Dai & Wipf)    fit_two_stage(latents, ...)
    "diffusion"  a diffusion model on the latents (LSGM's prior)     vae.diffusion_prior.fit_diffusion_prior

sample_latents(state, num, temperature) draws (num, D) latents from any of them.
"""

from collections import deque

import torch
from torch import nn
from tqdm import tqdm

from vae import diffusion_prior
from vae.errors import UserError
from vae.likelihoods import gaussian_nll_from_sse, sum_squared_error
from vae.losses import kl_divergence

SAMPLER_KINDS = ("prior", "gmm", "two-stage", "diffusion")
# Best first, by the FID of their samples on Flowers102 (README): what `sample` uses when none is named.
SAMPLER_PREFERENCE = ("diffusion", "gmm", "two-stage", "prior")
COVARIANCE_TYPES = ("full", "diag", "spherical", "tied")
# The paper's second latent equals the first (64 for CelebA); on 256-d synthetic latents with an 8-d structure,
# a 64-d second latent sampled far better than a 256-d one (latent-space Frechet distance 2.8 against 14).
SECOND_LATENT_SIZE = 64


def prior_state(latent_dim):
    """The state of the VAE's prior N(0, I) over D = latent_dim dimensions."""
    return {"kind": "prior", "latent_dim": int(latent_dim)}


def _as_latents(latents):
    latents = torch.as_tensor(latents).detach().cpu()
    if latents.ndim != 2:
        raise ValueError(f"expected flattened latents of shape (N, D), got {tuple(latents.shape)}")
    return latents


# ------------------------------------------------------------------------------ Gaussian mixture

def fit_gmm(latents, num_components, seed=0, covariance="full", reg_covar=1e-4, max_iter=200):
    """Fit a Gaussian mixture to latents (N, D) (posterior means or samples of the training images).

    Fitted by EM with scikit-learn's GaussianMixture (k-means initialisation, seeded); reg_covar (in squared
    latent units) is added to every covariance's diagonal, so that dimensions the posterior means barely use
    (inactive units) keep an invertible covariance. Every covariance type is stored as its Cholesky factor.

    Returns {"kind": "gmm", "weights": (K,), "means": (K, D), "scale_tril": (K, D, D), "covariance": str,
    "num_components": K, "latent_dim": D, "log_likelihood": mean log-density of the latents (nats per latent)}.
    """
    try:
        from sklearn.mixture import GaussianMixture
    except ImportError:
        raise UserError("fitting the GMM sampler needs scikit-learn: pip install -r requirements.txt") from None
    if covariance not in COVARIANCE_TYPES:
        raise ValueError(f"covariance must be one of {COVARIANCE_TYPES}, got {covariance!r}")
    data = _as_latents(latents).double().numpy()
    if len(data) < num_components:
        raise ValueError(f"{num_components} mixture components need at least as many latents, got {len(data)}")
    gmm = GaussianMixture(num_components, covariance_type=covariance, reg_covar=reg_covar, max_iter=max_iter,
                          random_state=seed).fit(data)
    num_components, latent_dim = gmm.means_.shape
    covariances = torch.from_numpy(gmm.covariances_)
    if covariance == "full":
        scale_tril = torch.linalg.cholesky(covariances)
    elif covariance == "tied":
        scale_tril = torch.linalg.cholesky(covariances).expand(num_components, -1, -1)
    elif covariance == "diag":
        scale_tril = torch.diag_embed(covariances.sqrt())
    else:  # spherical: one variance per component
        scale_tril = covariances.sqrt()[:, None, None] * torch.eye(latent_dim, dtype=torch.float64)
    return {
        "kind": "gmm",
        "weights": torch.from_numpy(gmm.weights_).float(),
        "means": torch.from_numpy(gmm.means_).float(),
        "scale_tril": scale_tril.float().contiguous(),
        "covariance": covariance,
        "num_components": int(num_components),
        "latent_dim": int(latent_dim),
        "log_likelihood": float(gmm.score(data)),
    }


# ------------------------------------------------------------------------------ two-stage VAE

def _mlp(in_size, hidden_size, out_size, num_layers):
    """num_layers hidden ReLU layers of hidden_size, then a linear output."""
    layers, size = [], in_size
    for _ in range(num_layers):
        layers += [nn.Linear(size, hidden_size), nn.ReLU()]
        size = hidden_size
    layers.append(nn.Linear(size, out_size))
    return nn.Sequential(*layers)


class _SecondStage(nn.Module):
    """The second-stage VAE of Dai & Wipf (2019): dense encoder and decoder, a Gaussian decoder whose variance
    gamma (one scalar, learned) can shrink towards 0 as the fit of the first-stage latents improves."""

    def __init__(self, latent_dim, second_latent_size, hidden_size, num_layers):
        super().__init__()
        self.encoder = _mlp(latent_dim, hidden_size, 2 * second_latent_size, num_layers)
        self.decoder = _mlp(second_latent_size, hidden_size, latent_dim, num_layers)
        self.log_gamma = nn.Parameter(torch.zeros(()))  # gamma = 1: all variance unexplained at first

    def loss(self, z, min_log_gamma):
        """Negative ELBO in nats per latent vector, averaged over the batch (beta = 1)."""
        mean, log_var = self.encoder(z).chunk(2, dim=1)
        u = mean + torch.exp(0.5 * log_var) * torch.randn_like(mean)
        log_gamma = self.log_gamma.clamp(min=min_log_gamma)  # gamma is a variance: log sigma = log_gamma / 2
        reconstruction = gaussian_nll_from_sse(sum_squared_error(z, self.decoder(u)), 0.5 * log_gamma, z.shape[1])
        return (reconstruction + kl_divergence(mean, log_var)).mean()


def fit_two_stage(latents, second_latent_size=None, hidden_size=256, num_layers=2, steps=1500, batch_size=256,
                  lr=3e-3, min_log_gamma=-9.0, seed=0, device="cpu", progress=False):
    """Fit the two-stage VAE sampler (Dai & Wipf 2019) to latents (N, D) of the training images.

    A small dense VAE learns the first-stage latents' distribution; sampling draws its prior N(0, I) and maps
    the draw through its decoder (mean) back to the first latent space. Latents are standardised per dimension
    first (the affine map is stored and undone when sampling). Trained with Adam for `steps` steps of
    `batch_size` latents, the learning rate cosine-annealed from `lr` to 0; the decoder variance gamma is kept
    above exp(min_log_gamma) (in standardised units) so the loss stays finite. The second latent size defaults
    to min(D, 64) (the paper uses D, which was 64 there). Sampling decodes the decoder's mean, as in the paper.
    Training on 2,000 x 256 latents with the defaults takes about 30 s on one CPU thread.

    Returns {"kind": "two-stage", "latent_dim": D, "second_latent_size", "hidden_size", "num_layers",
    "decoder": state_dict of the decoder MLP, "shift": (D,), "scale": (D,), "gamma": decoder variance,
    "loss": final negative ELBO (nats per standardised latent, a running mean over the last 100 steps)}.
    """
    data = _as_latents(latents).float()
    latent_dim = data.shape[1]
    second_latent_size = int(second_latent_size or min(latent_dim, SECOND_LATENT_SIZE))
    shift = data.mean(0)
    scale = data.std(0).clamp(min=1e-6)  # a constant dimension would divide by zero; it stays constant
    device = torch.device(device)
    data = ((data - shift) / scale).to(device)
    generator = torch.Generator().manual_seed(seed)
    # Seed locally: the caller's RNG streams (a training run's, say) continue as if nothing had been drawn.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # the initialisation and the reparameterisation noise
        model = _SecondStage(latent_dim, second_latent_size, hidden_size, num_layers).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
        recent = deque(maxlen=100)
        for _ in tqdm(range(steps), desc="two-stage sampler", unit="step", disable=not progress):
            batch = data[torch.randint(len(data), (min(batch_size, len(data)),), generator=generator).to(device)]
            loss = model.loss(batch, min_log_gamma)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            recent.append(loss.item())
    return {
        "kind": "two-stage",
        "latent_dim": int(latent_dim),
        "second_latent_size": second_latent_size,
        "hidden_size": int(hidden_size),
        "num_layers": int(num_layers),
        "decoder": {name: value.detach().cpu().clone() for name, value in model.decoder.state_dict().items()},
        "shift": shift,
        "scale": scale,
        "gamma": float(model.log_gamma.detach().clamp(min=min_log_gamma).exp()),
        "loss": float(sum(recent) / max(1, len(recent))),
    }


def _two_stage_decoder(state, device):
    decoder = _mlp(state["second_latent_size"], state["hidden_size"], state["latent_dim"], state["num_layers"])
    decoder.load_state_dict(state["decoder"])
    return decoder.to(device).eval()


# ------------------------------------------------------------------------------ sampling

@torch.no_grad()
def sample_latents(sampler_state, num, temperature=1.0, generator=None):
    """Draw num latents (num, D), float32, from a sampler state, with torch only.

    Draws on the generator's device (CPU without one); the same generator state gives the same latents.
    temperature T scales the spread: the prior is N(0, T^2 I); a GMM component k gives
    means_k + T * scale_tril_k @ eps (T = 0: the component means); the two-stage sampler draws its own prior
    at N(0, T^2 I) and decodes the draw; the diffusion prior scales its starting noise and every step's noise.
    """
    kind = sampler_state["kind"]
    device = generator.device if generator is not None else torch.device("cpu")
    if kind == "prior":
        return temperature * torch.randn(num, sampler_state["latent_dim"], generator=generator, device=device)
    if kind == "gmm":
        weights = sampler_state["weights"].to(device)
        means, scale_tril = sampler_state["means"].to(device), sampler_state["scale_tril"].to(device)
        component = torch.multinomial(weights, num, replacement=True, generator=generator)
        eps = torch.randn(num, means.shape[1], generator=generator, device=device)
        # One component at a time: gathering a (D, D) factor per sample would take num * D^2 memory.
        noise = torch.zeros_like(eps)
        for k in component.unique().tolist():
            chosen = component == k
            noise[chosen] = eps[chosen] @ scale_tril[k].T
        return means[component] + temperature * noise
    if kind == "two-stage":
        u = temperature * torch.randn(num, sampler_state["second_latent_size"], generator=generator, device=device)
        z = _two_stage_decoder(sampler_state, device)(u)
        return z * sampler_state["scale"].to(device) + sampler_state["shift"].to(device)
    if kind == "diffusion":
        return diffusion_prior.sample(sampler_state, num, temperature, generator, device)
    raise UserError(f"unknown sampler {kind!r}; choose one of {', '.join(SAMPLER_KINDS)}")


@torch.no_grad()
def gmm_vary(sampler_state, latents, strength, generator=None):
    """Variations of latents (B, D) under a fitted GMM: each latent moves within a mixture component, chosen with
    the probability that the component produced it, by the autoregressive step

        z' = mu_k + rho (z - mu_k) + sqrt(1 - rho^2) L_k eps,   rho = sqrt(signal_level(strength)),

    which leaves the component N(mu_k, L_k L_k^T) unchanged: strength 0 keeps z, strength 1 is a fresh draw of
    the component. rho is the diffusion prior's signal level at t = strength, so a strength means the same share
    of the photo's code kept in both modes."""
    device = generator.device if generator is not None else torch.device("cpu")
    latents = latents.to(device)
    if strength <= 0:
        return latents.clone()
    means, scale_tril = sampler_state["means"].to(device), sampler_state["scale_tril"].to(device)
    mixture = torch.distributions.MultivariateNormal(means, scale_tril=scale_tril)
    log_joint = mixture.log_prob(latents[:, None, :]) + sampler_state["weights"].to(device).log()
    component = torch.multinomial(torch.softmax(log_joint, dim=1), 1, generator=generator)[:, 0]
    rho = float(diffusion_prior.signal_level(min(float(strength), 1.0))) ** 0.5
    eps = torch.randn(latents.shape, generator=generator, device=device)
    noise = torch.einsum("bij,bj->bi", scale_tril[component], eps)
    center = means[component]
    return center + rho * (latents - center) + (1 - rho ** 2) ** 0.5 * noise
