"""Samplers of the latent space: where z comes from before decoding, and how a photo's z is moved to make
variations of it. One class each, registered by its --sampler name:

    "prior"      N(0, T^2 I), the VAE's own prior                  Prior
    "gmm"        a Gaussian mixture (Ghosh et al. 2020)             GaussianMixture
    "two-stage"  a second, small VAE on the latents (Dai & Wipf)   TwoStage
    "diffusion"  a diffusion model on the latents (LSGM's prior)    vae.diffusion_prior.DiffusionPrior
    "kind"       a code of the flower's kind, and a diffusion prior   vae.kind_prior.KindPrior
                 over the rest conditioned on it

A VAE's aggregate posterior q(z) = E_x q(z|x) rarely matches its prior N(0, I): there are holes where the
prior puts mass but no image's posterior does, and decoding from them gives the blurry or odd samples that
make prior samples look worse than reconstructions. An "ex-post" density fitted to the training images'
latents fixes much of this.

A sampler is fitted to the training images' posteriors (Sampler.fit), draws latents (sample) and, where it can,
moves a photo's latent to a new one of the same kind (vary). Its `state` is a plain dict of tensors, ints,
floats and strings, so it saves inside a checkpoint that loads with torch.load(weights_only=True), and sampling
needs no data and no scikit-learn. Every sampler works on flattened latents (N, D): a spatial latent (C, H, W)
is flattened by the caller, and samples are reshaped back. To add one: subclass Sampler, decorate it with
@register, and it is a --sampler choice, a --mode of variations when it has vary, an export --fit-samplers
kind, and a choice on the page (docs/inference.md#adding-a-sampler).
"""

import dataclasses
import math

import torch
from torch import nn

from vae.errors import UserError
from vae.fitting import fit_network
from vae.likelihoods import gaussian_nll_from_sse, sum_squared_error
from vae.losses import kl_divergence
from vae.vae import posterior_moments

SAMPLERS = {}  # --sampler name -> class


def register(cls):
    """Class decorator: make a Sampler subclass available under cls.name."""
    SAMPLERS[cls.name] = cls
    return cls


@dataclasses.dataclass
class Posteriors:
    """What a sampler is fitted to: the posteriors q(z|x) = N(means, stds^2) of the training images, each
    flattened to (N, D) on the CPU, and of their mirror images when the VAE trained on them (--hflip)."""

    means: torch.Tensor
    stds: torch.Tensor
    latent_shape: tuple
    mirrored: tuple = None  # (means, stds) of the mirror images, or None
    classes: torch.Tensor = None  # (N,) class of each image (0: unknown), or None

    @classmethod
    def of(cls, model, images_uint8, hflip=False, classes=None):
        means, stds = posterior_moments(model, images_uint8)
        mirrored = posterior_moments(model, images_uint8.flip(-1)) if hflip else None
        classes = None if classes is None else torch.as_tensor(classes, dtype=torch.long)
        return cls(means, stds, tuple(model.latent_shape), mirrored, classes)

    def all(self):
        """(means, stds) of every image the VAE trained on: the photos, then their mirror images if any."""
        if self.mirrored is None:
            return self.means, self.stds
        return torch.cat([self.means, self.mirrored[0]]), torch.cat([self.stds, self.mirrored[1]])

    def all_classes(self):
        """The classes of all(): a mirror image has its photo's class. None when the classes are unknown."""
        if self.classes is None or self.mirrored is None:
            return self.classes
        return torch.cat([self.classes, self.classes])


class Sampler:
    """A distribution over flattened latents (N, D), built from its state (a plain dict whose "kind" is the name).

    Subclasses set `name`, `description` (for --help and the page) and `rank` (`auto` picks the lowest rank a
    checkpoint holds), and implement fit and sample; vary where the sampler can make variations of a photo.
    after_training(config) says whether a training run fits it at its end, and with which options of fit;
    config_of(options) maps those options back to the run's settings.
    """

    name = ""
    description = ""
    rank = 50
    needs_fitting = True  # False for a sampler that needs no data (the prior)
    min_images = 1  # the fewest training images it can be fitted to

    def __init__(self, state):
        self.state = state

    @classmethod
    def fit(cls, posteriors, seed=0, steps=None, device="cpu", progress=False):
        """A sampler fitted to `posteriors` (a Posteriors); steps: training steps of one that trains a network
        (None: its default)."""
        raise NotImplementedError

    @classmethod
    def after_training(cls, config):
        """None when a training run with this config does not fit it at its end, else the keyword arguments of
        fit it then takes (e.g. {"steps": 3000})."""
        return None

    @classmethod
    def config_of(cls, options):
        """The inverse of after_training: the run settings under which a training run fits this sampler with the
        fit keywords `options` (e.g. {"diffusion_prior_steps": 3000}), which export writes into the checkpoint's
        config when it fits one, so that the config says how the sampler it holds was fitted."""
        return {}

    def sample(self, num, temperature=1.0, generator=None):
        """num latents (num, D), float32, on the generator's device (CPU without one); T scales the spread."""
        raise NotImplementedError

    def vary(self, latents, strength, generator=None):
        """Latents (B, D) moved by `strength` in [0, 1]: 0 keeps them, 1 is a fresh draw of the sampler."""
        raise NotImplementedError

    @classmethod
    def can_vary(cls):
        return cls.vary is not Sampler.vary

    def check(self, latent_dim):
        """Raise if the state does not make latents of latent_dim dimensions: by default, two seeded draws must
        have that shape and be finite (cheap for the samplers without a network)."""
        drawn = self.sample(2, generator=torch.Generator().manual_seed(0))
        if tuple(drawn.shape) != (2, latent_dim) or not torch.isfinite(drawn).all():
            raise ValueError(f"its draws have shape {tuple(drawn.shape)} (expected {(2, latent_dim)})"
                             + ("" if torch.isfinite(drawn).all() else " and are not finite"))


class NetworkSampler(Sampler):
    """A sampler whose state holds a network's weights: network(device) builds it from the state (load_network)
    once per device and keeps it."""

    def __init__(self, state):
        super().__init__(state)
        self._networks = {}

    def network(self, device):
        device = torch.device(device)
        if device not in self._networks:
            self._networks[device] = self.load_network(device)
        return self._networks[device]

    def load_network(self, device):
        """The network the state holds, in eval mode on device."""
        raise NotImplementedError

    def check(self, latent_dim):
        """The network loads from the state (its shapes fit) for latents of latent_dim dimensions; no sampling,
        which would take a whole reverse diffusion."""
        if self.state["latent_dim"] != latent_dim:
            raise ValueError(f"it draws latents of {self.state['latent_dim']} dimensions, the model has {latent_dim}")
        self.network("cpu")


def ranked(names):
    """Names of registered samplers, best (lowest rank) first."""
    return sorted(names, key=lambda name: SAMPLERS[name].rank)


def load_sampler(state):
    """The Sampler a stored state describes."""
    kind = state.get("kind") if isinstance(state, dict) else None
    if kind not in SAMPLERS:
        raise UserError(f"unknown sampler {kind!r}; the registered ones are {', '.join(SAMPLERS)}")
    return SAMPLERS[kind](state)


def checked_sampler(name, state, latent_dim, path):
    """The Sampler stored under `name` in the checkpoint at `path`, checked before any use: its state is a
    registered sampler of that name, every tensor in it is finite, and check() passes for a model of latent_dim
    dimensions. A damaged one is a one-line UserError naming the file, the sampler and the problem."""
    def damaged(problem):
        return UserError(f"{path} is damaged: its {name} sampler {problem}; use another checkpoint, or fit it again "
                         f"with python vae_inference.py export --checkpoint {path} --fit-samplers {name} --out NEW.pt")

    if name not in SAMPLERS:
        raise UserError(f"{path} holds an unknown sampler {name!r} (the registered ones are {', '.join(SAMPLERS)}): "
                        f"it was written by code that registers it; use that code, or another checkpoint")
    if not isinstance(state, dict) or state.get("kind") != name:
        raise damaged(f"is not a stored {name} sampler (kind {state.get('kind') if isinstance(state, dict) else state!r})")
    for where, tensor in _tensors_in(state):
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise damaged(f"holds NaN or infinite values in {where}")
    sampler = SAMPLERS[name](state)
    try:
        sampler.check(latent_dim)
    except Exception as error:  # a missing key, a wrong shape or type: whatever a damaged state makes fail
        reason = " ".join(line.strip() for line in str(error).splitlines()[:2])[:200]
        raise damaged(f"does not fit this model ({type(error).__name__}: {reason})") from None
    return sampler


def _tensors_in(value, where="state"):
    """(where, tensor) of every tensor inside nested dicts and lists."""
    if torch.is_tensor(value):
        yield where, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors_in(item, f"{where}[{key!r}]" if where != "state" else repr(key))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _tensors_in(item, f"{where}[{index}]")


def fit_samplers(model, images_uint8, names, seed=0, hflip=False, options=None, progress=False, classes=None):
    """{name: state} of the samplers `names`, fitted to the posteriors of the training images (and their mirror
    images with hflip, for the samplers that use them). options: {name: {option: value}}, keywords of a
    sampler's fit (such as "steps" for those that train a network); what is not given takes its default.
    classes: each image's class (0: unknown), for the samplers that learn from them."""
    posteriors = Posteriors.of(model, images_uint8, hflip, classes)
    device = next(model.parameters()).device
    return {name: SAMPLERS[name].fit(posteriors, seed=seed, device=device, progress=progress,
                                     **(options or {}).get(name, {})).state for name in names}


def check_enough_images(names, count, fix):
    """Refuse, before any work, to fit the samplers `names` to `count` training images when one needs more;
    fix: what the user can change, for the message."""
    for name in names:
        needed = SAMPLERS[name].min_images
        if count < needed:
            raise UserError(f"the {name} sampler is fitted to the training images and needs at least {needed}, "
                            f"but there would be {count}; {fix}")


def fitted_after_training(config):
    """{name: fit options} of the samplers a training run with this config fits at its end, best first."""
    options = {name: SAMPLERS[name].after_training(config) for name in ranked(SAMPLERS)}
    return {name: option for name, option in options.items() if option is not None}


@torch.no_grad()
def sample_latents(state, num, temperature=1.0, generator=None):
    """Draw num latents (num, D) from a stored sampler state; the same generator state gives the same latents."""
    return load_sampler(state).sample(num, temperature, generator)


def _device(generator):
    return generator.device if generator is not None else torch.device("cpu")


def _flat(latents):
    latents = torch.as_tensor(latents).detach().cpu()
    if latents.ndim != 2:
        raise ValueError(f"expected flattened latents of shape (N, D), got {tuple(latents.shape)}")
    return latents


def keep_rate(strength):
    """rho in [0, 1]: the share of a latent kept at `strength` by the autoregressive moves below, the diffusion
    prior's signal level sqrt(a(t)) at t = strength, so that a strength keeps as much of a photo in every mode."""
    from vae.diffusion_prior import signal_level

    return float(signal_level(min(float(strength), 1.0))) ** 0.5


# ------------------------------------------------------------------------------ the VAE's prior

@register
class Prior(Sampler):
    name = "prior"
    description = "the VAE's own prior N(0, I)"
    rank = 90
    needs_fitting = False

    @classmethod
    def of_size(cls, latent_dim):
        return cls({"kind": cls.name, "latent_dim": int(latent_dim)})

    @classmethod
    def fit(cls, posteriors, seed=0, steps=None, device="cpu", progress=False):
        return cls.of_size(posteriors.means.shape[1])

    def sample(self, num, temperature=1.0, generator=None):
        return temperature * torch.randn(num, self.state["latent_dim"], generator=generator, device=_device(generator))


# ------------------------------------------------------------------------------ Gaussian mixture

COVARIANCE_TYPES = ("full", "diag", "spherical", "tied")
GMM_COMPONENTS = 4
GMM_MAX_DIMS_AFTER_TRAINING = 1024


def fit_gmm(latents, num_components, seed=0, covariance="full", reg_covar=1e-4, max_iter=200):
    """Fit a Gaussian mixture to latents (N, D) (posterior means or samples of the training images).

    Fitted by EM with scikit-learn's GaussianMixture (k-means initialisation, seeded); reg_covar (in squared
    latent units) is added to every covariance's diagonal, so that dimensions the posterior means barely use
    (inactive units) keep an invertible covariance. Every covariance type is stored as its Cholesky factor.

    Returns {"kind": "gmm", "weights": (K,), "means": (K, D), "scale_tril": (K, D, D), "covariance": str,
    "num_components": K, "latent_dim": D, "log_likelihood": mean log-density of the latents (nats per latent)}.
    """
    try:
        from sklearn.mixture import GaussianMixture as SklearnMixture
    except ImportError:
        raise UserError("fitting the GMM sampler needs scikit-learn: pip install -r requirements.txt") from None
    if covariance not in COVARIANCE_TYPES:
        raise ValueError(f"covariance must be one of {COVARIANCE_TYPES}, got {covariance!r}")
    data = _flat(latents).double().numpy()
    if len(data) < num_components:
        raise ValueError(f"{num_components} mixture components need at least as many latents, got {len(data)}")
    gmm = SklearnMixture(num_components, covariance_type=covariance, reg_covar=reg_covar, max_iter=max_iter,
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


@register
class GaussianMixture(Sampler):
    name = "gmm"
    description = "a Gaussian mixture fitted to the training images' posterior means; variations move the " \
                  "photo's code within its component"
    rank = 20
    min_images = 2

    @classmethod
    def fit(cls, posteriors, seed=0, steps=None, device="cpu", progress=False):
        return cls(fit_gmm(posteriors.means, num_components=min(GMM_COMPONENTS, len(posteriors.means)), seed=seed))

    @classmethod
    def after_training(cls, config):
        # Each full covariance is D^2 numbers: 4 MB in all at 512 dims, 67 MB at 2,048, more than the model and its
        # diffusion priors together. Larger latents fit it only when asked (export --fit-samplers gmm).
        latent_dim = math.prod(config.latent_shape) if config.latent_shape else config.latent_size
        return {} if latent_dim <= GMM_MAX_DIMS_AFTER_TRAINING else None

    def _tensors(self, device):
        return (self.state["weights"].to(device), self.state["means"].to(device),
                self.state["scale_tril"].to(device))

    def sample(self, num, temperature=1.0, generator=None):
        """means_k + T * scale_tril_k @ eps for a component k drawn by its weight (T = 0: the component means)."""
        weights, means, scale_tril = self._tensors(_device(generator))
        component = torch.multinomial(weights, num, replacement=True, generator=generator)
        eps = torch.randn(num, means.shape[1], generator=generator, device=means.device)
        # One component at a time: gathering a (D, D) factor per sample would take num * D^2 memory.
        noise = torch.zeros_like(eps)
        for k in component.unique().tolist():
            chosen = component == k
            noise[chosen] = eps[chosen] @ scale_tril[k].T
        return means[component] + temperature * noise

    def vary(self, latents, strength, generator=None):
        """Each latent moves within a mixture component, chosen with the probability that the component produced
        it, by the autoregressive step

            z' = mu_k + rho (z - mu_k) + sqrt(1 - rho^2) L_k eps,   rho = keep_rate(strength),

        which leaves the component N(mu_k, L_k L_k^T) unchanged: strength 0 keeps z, 1 is a fresh draw of it."""
        device = _device(generator)
        out_device, latents = latents.device, latents.to(device)
        if strength <= 0:
            return latents.clone().to(out_device)
        weights, means, scale_tril = self._tensors(device)
        mixture = torch.distributions.MultivariateNormal(means, scale_tril=scale_tril)
        log_joint = mixture.log_prob(latents[:, None, :]) + weights.log()
        component = torch.multinomial(torch.softmax(log_joint, dim=1), 1, generator=generator)[:, 0]
        rho = keep_rate(strength)
        eps = torch.randn(latents.shape, generator=generator, device=device)
        noise = torch.einsum("bij,bj->bi", scale_tril[component], eps)
        center = means[component]
        return (center + rho * (latents - center) + (1 - rho ** 2) ** 0.5 * noise).to(out_device)


# ------------------------------------------------------------------------------ two-stage VAE

# The paper's second latent equals the first (64 for CelebA); on 256-d synthetic latents with an 8-d structure,
# a 64-d second latent sampled far better than a 256-d one (latent-space Frechet distance 2.8 against 14).
SECOND_LATENT_SIZE = 64


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
    first (the affine map is stored and undone when sampling). Trained by vae.fitting.fit_network for `steps`
    steps of `batch_size` latents, the learning rate cosine-annealed from `lr` to 0; the decoder variance gamma
    is kept above exp(min_log_gamma) (in standardised units) so the loss stays finite. The second latent size
    defaults to min(D, 64) (the paper uses D, which was 64 there).

    Returns {"kind": "two-stage", "latent_dim": D, "second_latent_size", "hidden_size", "num_layers",
    "decoder": state_dict of the decoder MLP, "shift": (D,), "scale": (D,), "gamma": decoder variance,
    "loss": final negative ELBO (nats per standardised latent, a running mean over the last steps)}.
    """
    data = _flat(latents).float()
    latent_dim = data.shape[1]
    second_latent_size = int(second_latent_size or min(latent_dim, SECOND_LATENT_SIZE))
    shift = data.mean(0)
    scale = data.std(0).clamp(min=1e-6)  # a constant dimension would divide by zero; it stays constant
    device = torch.device(device)
    data = ((data - shift) / scale).to(device)
    generator = torch.Generator().manual_seed(seed)

    def loss(network):
        batch = data[torch.randint(len(data), (min(batch_size, len(data)),), generator=generator).to(device)]
        return network.loss(batch, min_log_gamma)

    network, final_loss = fit_network(
        lambda: _SecondStage(latent_dim, second_latent_size, hidden_size, num_layers), loss, steps, lr, seed=seed,
        device=device, description="two-stage sampler", progress=progress)
    return {
        "kind": "two-stage",
        "latent_dim": int(latent_dim),
        "second_latent_size": second_latent_size,
        "hidden_size": int(hidden_size),
        "num_layers": int(num_layers),
        "decoder": {name: value.detach().cpu().clone() for name, value in network.decoder.state_dict().items()},
        "shift": shift,
        "scale": scale,
        "gamma": float(network.log_gamma.detach().clamp(min=min_log_gamma).exp()),
        "loss": final_loss,
    }


@register
class TwoStage(Sampler):
    name = "two-stage"
    description = "a second, small VAE fitted to the training images' posterior means (Dai & Wipf 2019)"
    rank = 30

    @classmethod
    def fit(cls, posteriors, seed=0, steps=None, device="cpu", progress=False):
        return cls(fit_two_stage(posteriors.means, seed=seed, progress=progress,
                                 **({"steps": steps} if steps else {})))

    def sample(self, num, temperature=1.0, generator=None):
        """Its own prior drawn at N(0, T^2 I), decoded (the decoder's mean) and the standardisation undone."""
        state, device = self.state, _device(generator)
        decoder = _mlp(state["second_latent_size"], state["hidden_size"], state["latent_dim"], state["num_layers"])
        decoder.load_state_dict(state["decoder"])
        u = temperature * torch.randn(num, state["second_latent_size"], generator=generator, device=device)
        with torch.no_grad():
            z = decoder.to(device).eval()(u)
        return z * state["scale"].to(device) + state["shift"].to(device)


# The diffusion priors register themselves; importing them here makes every built-in sampler known to the registry.
from vae import diffusion_prior, kind_prior  # noqa: E402, F401
