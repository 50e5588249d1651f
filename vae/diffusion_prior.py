"""A learned prior over the VAE's latent space: a small denoising diffusion model fitted to the training images'
posteriors (the second stage of LSGM, Vahdat et al. 2021, trained after the VAE instead of with it).

The VAE's prior N(0, I) puts mass where no image's posterior does; this model learns the aggregate posterior
q(z) = E_x q(z|x) instead, so that its draws decode to flower-like images. It also gives variations of a photo:
noise the photo's code part of the way and let the model denoise it (SDEdit, Meng et al. 2022). The photo's
kind survives in what the noise leaves of its code; the rest is filled in with what real flowers' codes hold.

The process (DDPM, Ho et al. 2020) runs in continuous time t in [0, 1] on standardised latents u:
    u_t = sqrt(a(t)) u_0 + sqrt(1 - a(t)) eps,   a(t) = cos^2(pi/2 (t + s) / (1 + s)),  s = 0.008
(the cosine schedule of Nichol & Dhariwal 2021), and a network predicts v = sqrt(a) eps - sqrt(1 - a) u_0 from
(u_t, t) (Salimans & Ho 2022): u_0 = sqrt(a) u_t - sqrt(1 - a) v needs no division by sqrt(a), which an
eps-prediction network's errors would be multiplied by near t = 1. A latent of shape
(C, H, W) is modelled as a C-channel map; a dense latent (D,) as a (D, 1, 1) map. The network is one of
vae/denoisers.py: new fits use the U-Net, trained under bf16 autocast where it is native and with min-SNR loss
weighting, and sample with DDIM; fits made before it keep their flat network and ancestral sampling.
Measured speeds and the FID-against-minutes curve: docs/prior.md.

The fitted model is a plain dict of tensors, ints and floats (see fit_diffusion_prior), so it is stored in a
checkpoint under "samplers" and loads with torch.load(weights_only=True); sampling needs no data. DiffusionPrior
is its sampler, registered as "diffusion" (vae/samplers.py).
"""

import math

import torch

from vae.denoisers import build_denoiser
from vae.device import native_bf16
from vae.fitting import fit_network
from vae.samplers import NetworkSampler, register


SCHEDULE_OFFSET = 0.008  # s of the cosine schedule: keeps a(0) just below 1 so eps is defined at t = 0
MAX_T = 0.999  # a(1) = 0 exactly would make sqrt(a) / sqrt(1 - a) degenerate; the last step starts just short
SAMPLING_STEPS = 50  # ancestral reverse steps of a full run; a variation at strength s takes about s times as many
DDIM_STEPS = 25  # deterministic steps of a full run with DDIM
DPM_STEPS = 10  # steps of a full run with DPM-Solver++(2M), a second-order solver of DDIM's path
DEFAULT_STEPS_OF = {"ddpm": SAMPLING_STEPS, "ddim": DDIM_STEPS, "dpm": DPM_STEPS}  # the ways of denoise
METHODS = tuple(DEFAULT_STEPS_OF)
DEFAULT_STEPS = 6000  # training steps; recipes set their own (--diffusion-prior-steps), docs/prior.md the curve
EMA_DECAY = 0.999
MIN_SNR_GAMMA = 5.0  # the paper's choice
# Each network's size and Adam learning rate: "flat" is the network of earlier fits (its settings kept so that a
# refit is that model); "unet" is the default.
ARCHITECTURE_DEFAULTS = {
    "flat": {"width": 128, "num_blocks": 4, "lr": 2e-3},
    "unet": {"width": 32, "num_blocks": 1, "multipliers": (1, 2, 4), "lr": 1e-3},
}


def signal_level(t):
    """a(t) of the cosine schedule: the share of the variance of u_t that is signal (1 at t=0, 0 at t=1)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    level = torch.cos(0.5 * math.pi * (t + SCHEDULE_OFFSET) / (1 + SCHEDULE_OFFSET)).pow(2) / \
        math.cos(0.5 * math.pi * SCHEDULE_OFFSET / (1 + SCHEDULE_OFFSET)) ** 2
    return level.float()


def map_shape(latent_shape):
    """(C, H, W) the network sees for a latent of latent_shape: spatial latents as they are, dense ones as
    (D, 1, 1)."""
    return tuple(latent_shape) if len(latent_shape) == 3 else (int(latent_shape[0]), 1, 1)


def _network_options(state):
    """The registered denoiser and its options that a fitted state describes; states fitted before the U-Net have
    no "architecture" and hold the flat network."""
    architecture = state.get("architecture", "flat")
    options = {"width": state["width"], "num_blocks": state["num_blocks"]}
    if "multipliers" in state:
        options["multipliers"] = tuple(state["multipliers"])
    return architecture, options


def standardise(latents, state):
    return (latents - state["shift"].to(latents.device)) / state["scale"].to(latents.device)


def unstandardise(u, state):
    return u * state["scale"].to(u.device) + state["shift"].to(u.device)


def standardised_posteriors(means, stds, latent_shape, device):
    """({"shift", "scale"}, means, stds) of posteriors (N, *latent_shape) as (N, C, H, W) maps on device, in units
    where the aggregate posterior has mean 0 and variance 1 per dimension: Var z = Var(mean) + E[std^2]."""
    means = means.detach().float().reshape(len(means), *map_shape(latent_shape))
    stds = stds.detach().float().reshape(means.shape)
    shift = means.mean(0)
    scale = (means.var(0, unbiased=False) + stds.pow(2).mean(0)).sqrt().clamp(min=1e-6)
    state = {"shift": shift, "scale": scale}
    return state, standardise(means, state).to(device), (stds / scale).to(device)


def min_snr_weight(a, gamma=MIN_SNR_GAMMA):
    """The min-SNR-gamma weight of a v-prediction loss at signal level a (Hang et al., ICCV 2023).

    The paper weights the squared error of the predicted u_0 by min(SNR, gamma), SNR = a / (1 - a). Here
    u_0 = sqrt(a) u_t - sqrt(1 - a) v, so that error is (1 - a) = 1 / (SNR + 1) times the squared v error, and the
    v error's weight is min(SNR, gamma) / (SNR + 1). Nearly clean inputs, whose easy targets would otherwise pull
    the gradient, weigh less; the paper measured 3.4x faster convergence."""
    snr = a / (1 - a)
    return snr.clamp(max=gamma) / (snr + 1)


def denoising_loss(network, u0, t, eps, amp=False, min_snr=True):
    """The fit's loss on one batch: u0 (B, C, H, W) noised to times t (B,) with eps, the network's v-prediction
    against the true v, squared, weighted by min_snr_weight with min_snr, averaged. amp runs the network under
    bf16 autocast; the loss is computed in float32."""
    a = signal_level(t).to(u0.device)[:, None, None, None]
    v = a.sqrt() * eps - (1 - a).sqrt() * u0
    with torch.autocast(u0.device.type, dtype=torch.bfloat16, enabled=amp):
        predicted = network(a.sqrt() * u0 + (1 - a).sqrt() * eps, t)
    errors = (predicted.float() - v).pow(2)
    return (errors * min_snr_weight(a)).mean() if min_snr else errors.mean()


def fit_diffusion_prior(means, stds, latent_shape, steps=DEFAULT_STEPS, batch_size=128, lr=None,
                        architecture="unet", width=None, num_blocks=None, multipliers=None, min_snr=True, amp=None,
                        sampling="ddim", seed=0, device="cpu", progress=False):
    """Fit the diffusion prior to the aggregate posterior of the training images.

    means, stds: (N, *latent_shape) posterior means and standard deviations of the training images (include
    their mirror images when the VAE trained with --hflip). Each step draws a batch of fresh z ~ q(z|x) =
    N(mean, std^2), so the model learns the aggregate posterior, the distribution the decoder was trained on,
    not N points it could memorise. Latents are standardised per dimension (shift and scale stored).

    architecture: a network of vae/denoisers.py ("unet", or "flat", the network of earlier fits); width,
    num_blocks and multipliers default to that network's ARCHITECTURE_DEFAULTS. min_snr weights the loss by
    min_snr_weight. amp: bf16 autocast for the network (None: where it is native, on CUDA or a CPU with
    AVX512-BF16 or AMX); the loss and the weights stay float32. sampling: how samples are drawn later, "ddim"
    (deterministic, DDIM_STEPS) or "ddpm" (ancestral, SAMPLING_STEPS), stored with the state.

    Fitted by vae.fitting.fit_network: Adam, its learning rate warmed up over the first 5% of `steps` and then
    cosine-annealed to 0, and a moving average of the weights (decay 0.999), which is what is stored. The
    caller's RNG streams are untouched.

    Returns {"kind": "diffusion", "latent_shape", "latent_dim", "architecture", "width", "num_blocks"
    (and "multipliers" for the U-Net), "sampling", "network": the averaged weights, "shift", "scale", "steps",
    "loss": the mean training loss over the last steps}.
    """
    device = torch.device(device)
    defaults = ARCHITECTURE_DEFAULTS[architecture]
    width, num_blocks = width or defaults["width"], num_blocks or defaults["num_blocks"]
    multipliers = multipliers or defaults.get("multipliers")
    lr = lr or defaults["lr"]
    if amp is None:
        amp = device.type == "cuda" or (device.type == "cpu" and native_bf16())
    state, means_u, stds_u = standardised_posteriors(means, stds, latent_shape, device)
    shift, scale = state["shift"], state["scale"]
    generator = torch.Generator(device=device).manual_seed(seed)

    def loss(network):
        index = torch.randint(len(means_u), (min(batch_size, len(means_u)),), generator=generator, device=device)
        u0 = means_u[index] + stds_u[index] * torch.randn(means_u[index].shape, generator=generator, device=device)
        t = torch.rand(len(u0), generator=generator, device=device) * MAX_T
        eps = torch.randn(u0.shape, generator=generator, device=device)
        return denoising_loss(network, u0, t, eps, amp, min_snr)

    options = {"width": int(width), "num_blocks": int(num_blocks)}
    if multipliers is not None:
        options["multipliers"] = [int(multiplier) for multiplier in multipliers]
    network, final_loss = fit_network(
        lambda: build_denoiser(architecture, means_u.shape[1], means_u.shape[2:], **options), loss, steps, lr,
        seed=seed, device=device, warmup_steps=max(1, steps // 20), ema_decay=EMA_DECAY,
        description="diffusion prior", progress=progress)
    return {
        "kind": "diffusion",
        "latent_shape": [int(size) for size in latent_shape],
        "latent_dim": int(math.prod(latent_shape)),
        "architecture": architecture,
        **options,
        "sampling": sampling,
        "network": {name: value.detach().cpu().clone() for name, value in network.state_dict().items()},
        "shift": shift.cpu(),
        "scale": scale.cpu(),
        "steps": int(steps),
        "loss": final_loss,
    }


def draw_noise(shape, generator, device):
    """Standard normal noise on `device`, drawn from the generator (on its own device) when one is given."""
    return torch.randn(shape, generator=generator,
                       device=generator.device if generator is not None else device).to(device)


def load_denoiser(state, device):
    architecture, options = _network_options(state)
    shape = map_shape(state["latent_shape"])
    network = build_denoiser(architecture, shape[0], shape[1:], **options)
    network.load_state_dict(state["network"])
    return network.to(device).eval()


@torch.no_grad()
def denoise(network, u, t_start, generator=None, temperature=1.0, method="ddpm", steps=None):
    """Run the reverse process with the denoiser `network` on standardised latents u (B, C, H, W) from t_start
    down to t = 0, on an even grid of max(1, round(steps * t_start)) steps. Returns u_0 (B, C, H, W).

    method "ddpm": ancestral steps (Ho et al. 2020), each a draw from the posterior q(u_s | u_t, u_0 = predicted)
    of the forward process, `temperature` scaling the noise of every step; steps defaults to SAMPLING_STEPS.
    method "ddim": deterministic steps (Song et al. 2021, eta = 0) that move u_t to u_s along the predicted
    u_0 and noise, u_s = sqrt(a_s) u_0 + sqrt(1 - a_s) eps; steps defaults to DDIM_STEPS.
    method "dpm": DPM-Solver++(2M) (Lu et al. 2022), the same deterministic path solved to second order in the
    log signal-to-noise ratio lambda = log(sqrt(a) / sqrt(1 - a)): with h = lambda_s - lambda_t,
    u_s = sqrt((1 - a_s) / (1 - a_t)) u_t - sqrt(a_s) (e^-h - 1) D, where D is the predicted u_0 corrected by the
    previous step's, D = (1 + 1/2r) u_0 - (1/2r) u_0', r = h' / h (the first step: D = u_0, which is DDIM's step);
    steps defaults to DPM_STEPS.
    """
    steps = steps or DEFAULT_STEPS_OF[method]
    num_steps = max(1, round(steps * t_start))
    times = torch.linspace(t_start, 0.0, num_steps + 1).tolist()
    previous = None  # DPM-Solver's last (predicted u_0, h)
    for t, s in zip(times[:-1], times[1:]):
        a_t, a_s = float(signal_level(t)), float(signal_level(s))
        v = network(u, torch.full((len(u),), t, device=u.device))
        u0 = math.sqrt(a_t) * u - math.sqrt(1 - a_t) * v
        if s == 0.0:
            return u0
        if method == "ddim":
            eps = math.sqrt(a_t) * v + math.sqrt(1 - a_t) * u
            u = math.sqrt(a_s) * u0 + math.sqrt(1 - a_s) * eps
            continue
        if method == "dpm":
            h = 0.5 * math.log(a_s / (1 - a_s)) - 0.5 * math.log(a_t / (1 - a_t))
            corrected = u0 if previous is None else \
                (1 + 0.5 * h / previous[1]) * u0 - 0.5 * h / previous[1] * previous[0]
            u = math.sqrt((1 - a_s) / (1 - a_t)) * u - math.sqrt(a_s) * math.expm1(-h) * corrected
            previous = (u0, h)
            continue
        # q(u_s | u_t, u_0): mean and variance of the forward process's Gaussian posterior.
        alpha = a_t / a_s  # signal kept from s to t
        variance = (1 - alpha) * (1 - a_s) / (1 - a_t)
        mean = (math.sqrt(a_s) * (1 - alpha) * u0 + math.sqrt(alpha) * (1 - a_s) * u) / (1 - a_t)
        u = mean + temperature * math.sqrt(variance) * draw_noise(u.shape, generator, u.device)
    return u


@torch.no_grad()
def invert(network, u0, steps=DDIM_STEPS):
    """The deterministic DDIM path run forwards: standardised latents u0 (B, C, H, W) -> the noise at t = MAX_T that
    denoise(network, noise, MAX_T, method="ddim", steps=steps) maps back to about u0 (DDIM inversion, Song et al.
    2021; exact as the steps become small). Same time grid as denoise, walked from 0 up."""
    times = torch.linspace(MAX_T, 0.0, max(1, round(steps * MAX_T)) + 1).flip(0).tolist()
    u = u0
    for s, t in zip(times[:-1], times[1:]):
        a_s, a_t = float(signal_level(s)), float(signal_level(t))
        v = network(u, torch.full((len(u),), s, device=u.device))
        predicted_u0 = math.sqrt(a_s) * u - math.sqrt(1 - a_s) * v
        eps = math.sqrt(a_s) * v + math.sqrt(1 - a_s) * u
        u = math.sqrt(a_t) * predicted_u0 + math.sqrt(1 - a_t) * eps
    return u


@register
class DiffusionPrior(NetworkSampler):
    name = "diffusion"
    description = "noise the photo's code part of the way and denoise it with the learned diffusion prior " \
                  "(SDEdit): new flowers of the photo's colours and layout"
    rank = 10
    # How sample() draws; None: the fit's own method and its default steps. An instance may be given others:
    # benchmarks/sampling_steps.py compares them (docs/prior.md, "How samples are drawn").
    sample_method, sample_steps = None, None

    @classmethod
    def fit(cls, posteriors, seed=0, steps=None, device="cpu", progress=False):
        means, stds = posteriors.all()
        return cls(fit_diffusion_prior(means, stds, posteriors.latent_shape, steps=steps or DEFAULT_STEPS,
                                       seed=seed, device=device, progress=progress))

    @classmethod
    def after_training(cls, config):
        return {"steps": config.diffusion_prior_steps} if config.diffusion_prior_steps else None

    @classmethod
    def config_of(cls, options):
        return {"diffusion_prior_steps": options.get("steps") or DEFAULT_STEPS}

    @property
    def method(self):
        """How this prior samples: fits before DDIM sampled with DDPM's ancestral steps, and still do."""
        return self.state.get("sampling", "ddpm")

    def load_network(self, device):
        return load_denoiser(self.state, device)

    @torch.no_grad()
    def sample(self, num, temperature=1.0, generator=None):
        """Pure noise at t = MAX_T, scaled by the temperature (as is every ancestral step's noise), denoised."""
        device = generator.device if generator is not None else torch.device("cpu")
        u = temperature * draw_noise((num, *map_shape(self.state["latent_shape"])), generator, device)
        u = denoise(self.network(device), u, MAX_T, generator, temperature, method=self.sample_method or self.method,
                    steps=self.sample_steps)
        return unstandardise(u, self.state).flatten(1)

    @torch.no_grad()
    def vary(self, latents, strength, generator=None):
        """SDEdit: each latent (B, latent_dim) noised to time t = strength (0: unchanged; 1: all noise, a new
        sample) and denoised by the prior, on the latents' device."""
        if strength <= 0:
            return latents.clone()
        t = min(float(strength), MAX_T)
        u = standardise(latents.reshape(len(latents), *map_shape(self.state["latent_shape"])), self.state)
        a = float(signal_level(t))
        u = math.sqrt(a) * u + math.sqrt(1 - a) * draw_noise(u.shape, generator, u.device)
        return unstandardise(denoise(self.network(u.device), u, t, generator, method=self.method),
                              self.state).flatten(1)
