"""The "kind" sampler: a small global code that holds a flower's kind, and a diffusion prior over the spatial
latent conditioned on it. It makes new flowers of a photo's kind, samples of a class, and a latent space with
attributes to walk.

A spatial latent of 8x8x8 numbers holds a photo's layout, colours and kind together, and noising it (SDEdit, the
"diffusion" mode) loses the kind, carried by petal shape and texture, before the variations become varied. Here a
small encoder maps a photo's latent to a code of CODE_SIZE numbers, on a sphere, and the U-Net denoiser of
vae/denoisers.py is conditioned on it (its embedding added to the time embedding). Both are trained together by
the denoising loss alone, in one of two designs ("pairing"):

  neighbour  the code comes from another photo of the same class (Flowers102's labels, class sub-folders), or,
             without classes, from one of the photo's NEIGHBOURS nearest neighbours in the VAE's latent space.
             What the code can tell the denoiser is what two photos of a kind share, so that is what it learns
             (IC-GAN, Casanova et al., NeurIPS 2021, conditions on neighbours for the same reason).
  self       the code comes from the photo itself: a diffusion autoencoder over the latent (Preechakul et al.,
             CVPR 2022). The code holds whatever helps to denoise that photo, layout included.

docs/kind.md measures both: "self" kept a photo's species twice as often and gave better samples, so new fits use
it; "neighbour" stays a choice of fit_kind_prior and of benchmarks/kind_designs.py. A code that rebuilds its own
photo makes near-copies, so new fits also add CODE_NOISE to each of the code's numbers (fit_kind_prior's
code_noise): the code then carries too few bits to rebuild a photo, only what many photos of a kind share, and a
photo's variations draw the same noise around its code. The code is dropped (the condition zeroed) for DROP_CODE
of the training examples, so the same network is also the unconditional prior, and classifier-free guidance (Ho &
Salimans 2021) sets how strongly a code is followed: v = v_uncond + w (v_cond - v_uncond).

One strength knob makes variations, from the photo to any flower:
  0 .. KIND_STRENGTH   the photo's code is kept (with the fit's code noise around it), its latent noised to depth
                       t = strength / KIND_STRENGTH and denoised under guidance GUIDANCE (SDEdit): at the default,
                       vae.inference.DEFAULT_STRENGTH = 0.2, a new flower of the photo's kind that keeps some of its
                       layout; at KIND_STRENGTH everything but the code is drawn anew;
  KIND_STRENGTH .. 1   the guidance falls from GUIDANCE to 0: at 1 the code is ignored, a sample of any flower.
Samples draw a code from a Gaussian mixture fitted to the training photos' codes, then the rest, with DDIM (as do
walks of the code and variations: deterministic given the noise, a walk changes only what its code changes). The
fitted state is plain tensors and numbers, stored in a checkpoint under "samplers"; sampling needs no data, and the
Inception network of the measurements is nowhere in it.
"""

import math

import torch
from torch import nn
from torch.nn import functional as F

from vae.denoisers import UNetDenoiser, unet_levels
from vae.device import native_bf16
from vae import diffusion_prior as diffusion  # its names are read when used: it imports this module's registry
from vae.errors import UserError
from vae.fitting import fit_network
from vae.samplers import GaussianMixture, NetworkSampler, fit_gmm, register

CODE_SIZE = 16
PAIRINGS = ("self", "neighbour")  # the first is the default
MIN_CLASS_SIZE = 4  # latents per class on average (a photo and its mirror image are two) for classes to be used
NEIGHBOURS = 8  # without classes, a photo's partners are its 8 nearest neighbours (its mirror image among them)
DROP_CODE = 0.1  # share of training examples whose code is dropped: the unconditional prior is learned with it
GUIDANCE = 1.5  # classifier-free guidance scale of variations and samples (1: the conditional model as trained)
KIND_STRENGTH = 0.35  # all but the photo's code drawn anew; below it, SDEdit under the code
CODE_NOISE = 1.0  # standard deviation added to each code number in the fit and in variations (docs/kind.md)
CODE_COMPONENTS = 16  # Gaussian mixture components of the codes' prior
# How far a walk of the code (traverse, the page) turns each way by default, in spreads of the training codes along
# a direction: the code noise alone turns a photo's code by about 45 degrees, so a walk that changes the kind turns
# further (4 spreads of 1.1 to 1.5 are arcs of 65 to 85 degrees).
WALK_RANGE = 4.0
DEFAULT_STEPS = 12000  # the noisy code's variations keep the species more often after 12,000 steps (docs/kind.md)


class CodeEncoder(nn.Module):
    """A standardised latent map (B, C, H, W) -> its code (B, code_size), on the sphere of radius sqrt(code_size):
    three convolutions (the last two halving the map where it is large enough, as the U-Net's levels do), an
    average over positions, and a linear map. The average makes the code blind to where on the map a feature is;
    the sphere keeps codes of one scale, so that a mixture fits them and guidance means the same for every photo.
    A dense latent, a (D, 1, 1) map, gets 1x1 convolutions: an MLP."""

    def __init__(self, channels, spatial_size=(8, 8), code_size=CODE_SIZE, width=64):
        super().__init__()
        kernel_size = 1 if tuple(spatial_size) == (1, 1) else 3
        halvings = unet_levels(spatial_size)
        layers, current = [], channels
        for layer, out_width in enumerate((width, 2 * width, 2 * width)):
            stride = 2 if 0 < layer <= halvings else 1
            layers += [nn.Conv2d(current, out_width, kernel_size, stride=stride, padding=kernel_size // 2), nn.SiLU()]
            current = out_width
        self.layers = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(current, code_size))

    def forward(self, u):
        return on_sphere(self.layers(u).float())


def on_sphere(codes):
    """Codes (B, K) scaled to norm sqrt(K): the norm of a standard normal vector of K numbers, on average."""
    return math.sqrt(codes.shape[1]) * F.normalize(codes, dim=1)


def around(codes, noise_level, generator):
    """Codes (B, K) with N(0, noise_level^2) added to each number, put back on the sphere: the code noise of a fit
    (fit_kind_prior's code_noise), in the fit and in the variations of a photo."""
    if noise_level <= 0:
        return codes
    return on_sphere(codes + noise_level * diffusion.draw_noise(codes.shape, generator, codes.device))


class KindDenoiser(nn.Module):
    """The code encoder and a U-Net whose v-prediction is conditioned on a code: (u_t, t, code) -> v."""

    def __init__(self, channels, spatial_size, code_size=CODE_SIZE, width=32, num_blocks=1, multipliers=(1, 2, 4),
                 num_classes=0):
        super().__init__()
        self.encoder = CodeEncoder(channels, spatial_size, code_size)
        # While fitting to labelled latents: a linear read-out of the class from the code (see fit_kind_prior). It
        # is not stored with the sampler: sampling needs only the encoder and the denoiser.
        self.class_head = nn.Linear(code_size, num_classes) if num_classes else None
        self.denoiser = UNetDenoiser(channels, spatial_size, width, num_blocks, multipliers)
        embedding_width = self.denoiser.embedding_width
        self.condition = nn.Sequential(nn.Linear(code_size, embedding_width), nn.SiLU(),
                                       nn.Linear(embedding_width, embedding_width))

    def forward(self, u, t, code=None, keep=None):
        """v predicted from u_t (B, C, H, W) at times t (B,) given codes (B, code_size). Without a code, and for
        the rows where keep (B,) is False, the unconditional prediction."""
        if code is None:
            return self.denoiser(u, t)
        condition = self.condition(code)
        if keep is not None:
            condition = condition * keep[:, None].to(condition.dtype)
        return self.denoiser(u, t, condition)


def guided(network, codes, guidance):
    """(u, t) -> v under classifier-free guidance: v_uncond + w (v_cond - v_uncond) with w = guidance (1: the
    conditional network, 0: the unconditional one); otherwise both in one batch."""
    def predict(u, t):
        if guidance == 1:
            return network(u, t, codes)
        if guidance == 0:
            return network(u, t)
        keep = torch.cat([torch.ones(len(u), dtype=torch.bool), torch.zeros(len(u), dtype=torch.bool)])
        both = network(torch.cat([u, u]), torch.cat([t, t]), torch.cat([codes, codes]), keep.to(u.device))
        conditional, unconditional = both.chunk(2)
        return unconditional + guidance * (conditional - unconditional)
    return predict


# ------------------------------------------------------------------------------------------------ partners

class Partners:
    """Whose code each training latent is denoised with: `self.draw(index, generator)` gives a partner per index.

    pairing "self": the latent itself. "neighbour": with classes (all known, at least two, MIN_CLASS_SIZE latents
    each on average), a latent of the same class drawn uniformly (itself included, one chance in the class's size);
    otherwise one of its NEIGHBOURS nearest neighbours (Euclidean, in the standardised latent space)."""

    def __init__(self, means_u, classes, pairing):
        if pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
        self.device = means_u.device
        labelled = classes is not None and bool((classes > 0).all()) and \
            2 <= len(classes.unique()) <= len(classes) / MIN_CLASS_SIZE
        self.by = "self" if pairing == "self" else "classes" if labelled else "neighbours"
        self.labels = torch.unique(classes, return_inverse=True)[1].to(self.device) if labelled else None
        if self.by == "classes":  # the latents sorted by class: class c's are order[starts[c]:starts[c] + counts[c]]
            self.classes = classes.to(self.device)
            self.order = torch.argsort(self.classes, stable=True)
            self.counts = torch.bincount(self.classes)
            self.starts = torch.cumsum(self.counts, 0) - self.counts
        elif self.by == "neighbours":
            self.neighbours = nearest_neighbours(means_u.flatten(1), min(NEIGHBOURS, len(means_u) - 1))

    def class_indices(self):
        """(N,) each latent's class as an index 0 .. classes - 1, or None when the classes are not used."""
        return self.labels

    def draw(self, index, generator):
        if self.by == "self":
            return index
        if self.by == "classes":
            cls = self.classes[index]
            offset = (torch.rand(len(index), generator=generator, device=self.device) * self.counts[cls]).long()
            return self.order[self.starts[cls] + offset]
        column = torch.randint(self.neighbours.shape[1], (len(index),), generator=generator, device=self.device)
        return self.neighbours[index, column]


def nearest_neighbours(points, count, chunk=1024):
    """(N, count) indices of each point's nearest other points (Euclidean), nearest first; count 0: itself."""
    if count < 1:
        return torch.arange(len(points), device=points.device)[:, None]
    found = []
    for start in range(0, len(points), chunk):
        distances = torch.cdist(points[start:start + chunk], points)
        rows = torch.arange(start, min(start + chunk, len(points)), device=points.device)
        distances[rows - start, rows] = float("inf")
        found.append(distances.topk(count, largest=False).indices)
    return torch.cat(found)


# --------------------------------------------------------------------------------------------------- fitting

def fit_kind_prior(means, stds, latent_shape, classes=None, pairing="self", code_size=CODE_SIZE,
                   class_weight=0.0, code_noise=CODE_NOISE, steps=DEFAULT_STEPS, batch_size=128, lr=None, amp=None,
                   seed=0, device="cpu", progress=False):
    """Fit the code encoder and the conditional denoiser together to the training images' posteriors.

    means, stds: (N, *latent_shape) posteriors (mirror images included when the VAE trained with --hflip);
    classes: (N,) their classes (0: unknown) or None. Each step draws fresh z ~ q(z|x) for a batch, noises them
    and trains the diffusion prior's U-Net (its ARCHITECTURE_DEFAULTS["unet"]) to predict v given the code of a
    partner's posterior mean (Partners), under min-SNR weighting, bf16 autocast where native (amp None), with
    DROP_CODE of the codes dropped. class_weight > 0, where the classes are used (Partners.class_indices): the
    loss adds class_weight times the cross-entropy of a linear read-out of the partner's class from its code, so
    that the code is also trained to tell the class (docs/kind.md measures it: its variations vary more and keep
    the species less often; the read-out is not stored). code_noise s > 0 adds N(0, s^2) to every number of
    the partner's code before it is put back on the sphere (per number the code has variance 1), so that the
    code carries at most (code_size / 2) log2(1 + 1 / s^2) bits, 8 for 16 numbers at s = 1, too few to rebuild
    each training photo however long the fit; its variations draw the same noise around the photo's code
    (KindPrior.vary). Adam, warm-up and cosine decay, a moving average of the weights
    (vae.fitting.fit_network). Then the codes of all training latents are fitted by a Gaussian mixture (sampling),
    averaged per class (sample --class) and their principal directions kept (traverse).

    Returns the state: {"kind": "kind", "latent_shape", "latent_dim", "code_size", "pairing", "partners" (how
    partners were chosen: classes, neighbours or self), "width", "num_blocks", "multipliers", "guidance",
    "network", "shift", "scale", "code_prior" (a gmm state), "classes", "class_codes",
    "code_directions", "code_spread", "class_weight", "code_noise", "steps", "loss" (with the read-out's term)}.
    """
    device = torch.device(device)
    defaults = diffusion.ARCHITECTURE_DEFAULTS["unet"]
    lr = lr or defaults["lr"]
    if amp is None:
        amp = device.type == "cuda" or (device.type == "cpu" and native_bf16())
    state, means_u, stds_u = diffusion.standardised_posteriors(means, stds, latent_shape, device)
    classes = None if classes is None else torch.as_tensor(classes, dtype=torch.long)
    partners = Partners(means_u, classes, pairing)
    generator = torch.Generator(device=device).manual_seed(seed)
    options = {"code_size": int(code_size), "width": defaults["width"], "num_blocks": defaults["num_blocks"],
               "multipliers": list(defaults["multipliers"])}

    labels = partners.class_indices() if class_weight > 0 else None

    def loss(network):
        index = torch.randint(len(means_u), (min(batch_size, len(means_u)),), generator=generator, device=device)
        u0 = means_u[index] + stds_u[index] * torch.randn(means_u[index].shape, generator=generator, device=device)
        partner = partners.draw(index, generator)
        keep = torch.rand(len(index), generator=generator, device=device) >= DROP_CODE
        t = torch.rand(len(u0), generator=generator, device=device) * diffusion.MAX_T
        eps = torch.randn(u0.shape, generator=generator, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            codes = network.encoder(means_u[partner])
        codes = around(codes, code_noise, generator)
        value = diffusion.denoising_loss(lambda noisy, times: network(noisy, times, codes, keep), u0, t, eps, amp)
        if labels is None:
            return value
        return value + class_weight * F.cross_entropy(network.class_head(codes), labels[partner])

    network, final_loss = fit_network(
        lambda: KindDenoiser(means_u.shape[1], means_u.shape[2:], **options,
                             num_classes=0 if labels is None else int(labels.max()) + 1),
        loss, steps, lr, seed=seed, device=device, warmup_steps=max(1, steps // 20), ema_decay=diffusion.EMA_DECAY,
        description="kind prior", progress=progress)
    with torch.no_grad():
        codes = torch.cat([network.encoder(batch) for batch in means_u.split(512)]).cpu()
    return {
        "kind": KindPrior.name,
        "latent_shape": [int(size) for size in latent_shape],
        "latent_dim": int(math.prod(latent_shape)),
        "pairing": pairing,
        "partners": partners.by,
        **options,
        "guidance": GUIDANCE,
        "network": {name: value.detach().cpu().clone() for name, value in network.state_dict().items()
                    if not name.startswith("class_head.")},
        "class_weight": float(class_weight if labels is not None else 0),
        "code_noise": float(code_noise),
        "shift": state["shift"].cpu(),
        "scale": state["scale"].cpu(),
        **code_statistics(codes, classes, seed),
        "steps": int(steps),
        "loss": final_loss,
    }


def code_statistics(codes, classes, seed=0):
    """What sampling and walking the codes need, from the training latents' codes (N, K): a Gaussian mixture of
    them ("code_prior"), each class's mean code on the sphere ("classes", "class_codes"), and their principal
    directions about their mean (rows, largest spread first) and spread (standard deviation) along each. (Fits
    made before typical_code() also stored the mean, "code_mean"; nothing reads it.)"""
    components = max(1, min(CODE_COMPONENTS, len(codes) // (4 * codes.shape[1])))
    known = sorted(set(classes.tolist()) - {0}) if classes is not None else []
    class_codes = torch.stack([on_sphere(codes[classes == c].mean(0, keepdim=True))[0] for c in known]) \
        if known else torch.zeros(0, codes.shape[1])
    mean = codes.mean(0)
    _, singular, directions = torch.linalg.svd(codes - mean, full_matrices=False)
    return {
        "code_prior": fit_gmm(codes, components, seed=seed),
        "classes": [int(c) for c in known],
        "class_codes": class_codes,
        "code_directions": directions.contiguous(),
        "code_spread": singular / max(1, len(codes) - 1) ** 0.5,
    }


# -------------------------------------------------------------------------------------------------- sampler

DRAW_CHUNK = 256  # latents denoised at once by draw()


@register
class KindPrior(NetworkSampler):
    name = "kind"
    description = f"keep the photo's code of its kind ({CODE_SIZE} numbers) and draw the rest from a prior " \
                  f"conditioned on it: up to strength {KIND_STRENGTH:g} its details are redrawn, above it its kind " \
                  f"loosens"
    rank = 5
    min_images = 2  # the code prior is a mixture fitted to the training codes
    # How sample() draws (None: the method's default steps). An instance may be given others:
    # benchmarks/sampling_steps.py compares them (docs/prior.md, "How samples are drawn").
    sample_method, sample_steps = "ddim", None
    # Noise drawn around each code that sample() takes from the mixture, as the fit drew its code noise around the
    # training codes (0: the mixture's codes as they are). docs/prior.md measures it; the benchmark sets it.
    sample_code_noise = 0.0

    @classmethod
    def fit(cls, posteriors, seed=0, steps=None, device="cpu", progress=False, code_noise=CODE_NOISE):
        means, stds = posteriors.all()
        return cls(fit_kind_prior(means, stds, posteriors.latent_shape, posteriors.all_classes(),
                                  code_noise=code_noise, steps=steps or DEFAULT_STEPS, seed=seed, device=device,
                                  progress=progress))

    @classmethod
    def after_training(cls, config):  # fitted at the end of training with the diffusion prior, or on its own
        if not (config.kind_prior_steps or config.diffusion_prior_steps):
            return None
        return {"steps": config.kind_prior_steps or config.diffusion_prior_steps, "code_noise": config.kind_code_noise}

    @classmethod
    def config_of(cls, options):
        return {"kind_prior_steps": options.get("steps") or DEFAULT_STEPS,
                "kind_code_noise": options.get("code_noise", CODE_NOISE)}

    def load_network(self, device):
        """The code encoder and the conditional denoiser."""
        state = self.state
        shape = diffusion.map_shape(state["latent_shape"])
        network = KindDenoiser(shape[0], shape[1:], state["code_size"], state["width"], state["num_blocks"],
                               tuple(state["multipliers"]))
        network.load_state_dict(state["network"])
        return network.to(device).eval()

    def check(self, latent_dim):
        """The network loads, the codes' statistics have the code's size, and the code noise is a standard
        deviation."""
        super().check(latent_dim)
        state, size = self.state, self.state["code_size"]
        GaussianMixture(state["code_prior"]).check(size)
        if len(state["classes"]) != len(state["class_codes"]) or (
                len(state["class_codes"]) and tuple(state["class_codes"].shape[1:]) != (size,)):
            raise ValueError(f"{len(state['classes'])} classes, class codes of shape "
                             f"{tuple(state['class_codes'].shape)}")
        if tuple(state["code_directions"].shape[1:]) != (size,) or \
                len(state["code_spread"]) != len(state["code_directions"]):
            raise ValueError(f"code directions of shape {tuple(state['code_directions'].shape)}")
        if not 0 <= state.get("code_noise", 0.0) < math.inf:
            raise ValueError(f"code noise {state['code_noise']}: a standard deviation, 0 or more")

    @property
    def guidance(self):
        return self.state["guidance"]

    @property
    def map_shape(self):
        """(C, H, W) of the maps the denoiser sees."""
        return diffusion.map_shape(self.state["latent_shape"])

    def _map(self, latents):
        return diffusion.standardise(latents.reshape(len(latents), *self.map_shape), self.state)

    @torch.no_grad()
    def codes(self, latents):
        """The codes (B, code_size) of flattened latents (B, latent_dim), on their device."""
        return self.network(latents.device).encoder(self._map(latents))

    def sample_codes(self, num, generator=None):
        """num codes drawn from the mixture fitted to the training photos' codes, put back on the sphere."""
        return on_sphere(GaussianMixture(self.state["code_prior"]).sample(num, 1.0, generator))

    def class_code(self, label):
        """The mean code of the training photos of class `label`, on the sphere (1, code_size)."""
        if label not in self.state["classes"]:
            known = self.state["classes"]
            raise UserError(f"class {label} is not one this model trained on; its classes are "
                            + (f"{known[0]} to {known[-1]}" if known else "unknown (its data had none)")
                            + ("" if known else ": use --like PHOTO instead"))
        return self.state["class_codes"][self.state["classes"].index(label)][None]

    @torch.no_grad()
    def draw(self, codes, generator=None, temperature=1.0, guidance=None, noise=None, method="ddim", steps=None):
        """Latents (B, latent_dim) drawn given codes (B, code_size): noise (drawn unless given, scaled by the
        temperature) denoised under `guidance` (default the fitted one) by vae.diffusion_prior.denoise's `method`
        and `steps` (default DDIM, deterministic given the noise), on the generator's device."""
        device = noise.device if noise is not None else generator.device if generator is not None else \
            torch.device("cpu")
        if noise is None:
            noise = temperature * diffusion.draw_noise((len(codes), *self.map_shape), generator, device)
        guidance = self.guidance if guidance is None else guidance
        network, codes, noise = self.network(device), codes.to(device), noise.to(device)
        # DRAW_CHUNK latents at a time bound the memory of a long walk (the same latents as one batch with DDIM).
        u = torch.cat([diffusion.denoise(guided(network, codes[start:start + DRAW_CHUNK], guidance),
                                         noise[start:start + DRAW_CHUNK], diffusion.MAX_T, generator, temperature,
                                         method=method, steps=steps)
                       for start in range(0, len(codes), DRAW_CHUNK)])
        return diffusion.unstandardise(u, self.state).flatten(1)

    def sample_given(self, codes, generator=None, temperature=1.0):
        """New latents (B, latent_dim) given codes (B, code_size), drawn as samples are (sample_method and
        sample_steps)."""
        return self.draw(codes, generator, temperature, method=self.sample_method, steps=self.sample_steps)

    def sample(self, num, temperature=1.0, generator=None):
        """A code from the codes' prior (with sample_code_noise around it), then the rest given it."""
        codes = around(self.sample_codes(num, generator), self.sample_code_noise, generator)
        return self.sample_given(codes, generator, temperature)

    @torch.no_grad()
    def vary(self, latents, strength, generator=None, code_noise=None, candidates=1):
        """Up to KIND_STRENGTH: SDEdit to depth strength / KIND_STRENGTH under the photo's code; above it, a new
        draw whose guidance falls linearly to 0 at strength 1 (see the module's docstring). code_noise: the noise
        drawn around the photo's code (default: the fit's). candidates > 1 draws that many variations of each photo
        and keeps the one whose code is nearest the photo's (docs/kind.md measures both knobs)."""
        if strength <= 0:
            return latents.clone()
        photo_codes = self.codes(latents)
        if candidates == 1:
            return self._vary_once(latents, photo_codes, strength, generator, code_noise)
        drawn = torch.stack([self._vary_once(latents, photo_codes, strength, generator, code_noise)
                             for _ in range(candidates)])
        closeness = torch.einsum("cbk,bk->cb", self.codes(drawn.flatten(0, 1)).view(candidates, len(latents), -1),
                                 photo_codes)  # codes share one norm: the nearest has the largest
        return drawn[closeness.argmax(0), torch.arange(len(latents))]

    def _vary_once(self, latents, photo_codes, strength, generator, code_noise):
        # The code as the fit saw it: a draw around the photo's (fits made before code_noise have none).
        codes = around(photo_codes, self.state.get("code_noise", 0.0) if code_noise is None else code_noise,
                       generator)
        if strength >= KIND_STRENGTH:
            loosened = (float(strength) - KIND_STRENGTH) / (1 - KIND_STRENGTH)
            return self.draw(codes, generator, guidance=self.guidance * (1 - loosened)).to(latents.device)
        t = min(float(strength) / KIND_STRENGTH, 1.0) * diffusion.MAX_T
        a = float(diffusion.signal_level(t))
        u = self._map(latents)
        u = math.sqrt(a) * u + math.sqrt(1 - a) * diffusion.draw_noise(u.shape, generator, u.device)
        u = diffusion.denoise(guided(self.network(u.device), codes, self.guidance), u, t, method="ddim")
        return diffusion.unstandardise(u, self.state).flatten(1)

    def typical_code(self):
        """A code (1, code_size) where the training codes are densest: the mean of the codes' heaviest mixture
        component, on the sphere. (Their overall mean can lie near the sphere's centre, a direction of no code.)"""
        mixture = self.state["code_prior"]
        return on_sphere(mixture["means"][mixture["weights"].argmax()][None].float())

    @torch.no_grad()
    def walk(self, center, rows, value_range, steps, generator=None):
        """Latents (rows * steps, latent_dim) of a traversal of the code: row r turns the code `center`
        (1, code_size) along the great circle towards the r-th principal direction of the training codes, by
        -value_range to +value_range of their spread along it (as an arc of the sphere); every image starts from
        the same noise, so only the code changes."""
        directions, spread = self.state["code_directions"], self.state["code_spread"]
        rows = min(rows, len(directions))
        values = torch.linspace(-value_range, value_range, steps)[:, None]
        start = on_sphere(center)
        radius = start.norm()
        codes = []
        for r in range(rows):  # the direction made orthogonal to the start, scaled to the sphere's radius
            towards = radius * F.normalize(directions[r] - (directions[r] @ start[0]) * start[0] / radius ** 2, dim=0)
            angle = values * spread[r] / radius
            codes.append(torch.cos(angle) * start + torch.sin(angle) * towards)
        codes = torch.cat(codes)
        noise = diffusion.draw_noise((1, *self.map_shape), generator, torch.device("cpu"))
        return self.draw(codes, generator, noise=noise.expand(len(codes), -1, -1, -1))

    @torch.no_grad()
    def interpolate(self, latent_a, latent_b, steps):
        """Latents (steps, latent_dim) between two photos' latents (1, latent_dim): each is inverted to its noise
        under its own code (DDIM inversion), then both the codes and the noises are walked along great circles and
        denoised again. The ends come back to about the photos' own latents."""
        network = self.network(latent_a.device)
        ends = torch.cat([latent_a, latent_b])
        codes = self.codes(ends)
        noise = diffusion.invert(guided(network, codes, 1.0), self._map(ends))
        from vae.inference import slerp
        times = torch.linspace(0, 1, steps).tolist()
        path_codes = torch.stack([on_sphere(slerp(codes[0], codes[1], t)[None])[0] for t in times])
        path_noise = torch.stack([slerp(noise[0], noise[1], t) for t in times])
        return self.draw(path_codes, guidance=1.0, noise=path_noise).to(latent_a.device)
