"""The learned diffusion prior and the variation modes: the noise schedule against its definition, the reverse
process against the distribution it was fitted to, SDEdit and the GMM step at their two ends, and the maths of
the diversity measure by hand."""

import math


import pytest
import torch
from torch import nn

from vae import diffusion_prior
from vae.denoisers import Denoiser, UNetDenoiser, unet_levels
from vae.metrics import mean_pairwise_rmse, same_class_pairwise_rmse
from vae.diffusion_prior import DiffusionPrior
from vae.samplers import GaussianMixture, fit_gmm, sample_latents
from vae.species import fit_species_classifier

LATENT = (2, 2, 2)


def test_the_cosine_schedule_runs_from_all_signal_to_none():
    assert diffusion_prior.signal_level(0.0).item() == pytest.approx(1.0)
    assert diffusion_prior.signal_level(1.0).item() == pytest.approx(0.0, abs=1e-6)
    t = torch.linspace(0, 1, 101)
    levels = diffusion_prior.signal_level(t)
    assert (levels[1:] < levels[:-1]).all()  # strictly decreasing
    # Nichol & Dhariwal's definition, f(t) / f(0) with f(t) = cos^2(pi/2 (t + s) / (1 + s)).
    f = lambda v: math.cos(math.pi / 2 * (v + 0.008) / 1.008) ** 2  # noqa: E731
    assert levels[50].item() == pytest.approx(f(0.5) / f(0.0), rel=1e-5)


@pytest.fixture(scope="module")
def two_clusters():
    """Codes of two kinds, +-2 on every dimension, with posterior noise 0.1: a distribution with a hole at 0."""
    generator = torch.Generator().manual_seed(0)
    signs = torch.randint(0, 2, (512, 1), generator=generator).float() * 2 - 1
    means = signs * 2.0 + 0.05 * torch.randn(512, 8, generator=generator)
    return means.view(512, *LATENT), torch.full((512, *LATENT), 0.1)


# The fit of earlier checkpoints (flat network, float32, unweighted loss, ancestral sampling) and today's default.
DESIGNS = {"flat": dict(architecture="flat", lr=3e-3, width=32, num_blocks=2, amp=False, min_snr=False,
                        sampling="ddpm"),
           "unet": dict(architecture="unet", width=16, num_blocks=1)}


@pytest.fixture(scope="module", params=list(DESIGNS))
def fitted(two_clusters, request):
    means, stds = two_clusters
    steps = 600 if request.param == "flat" else 300  # min-SNR weighting: the U-Net needs fewer
    return diffusion_prior.fit_diffusion_prior(means, stds, LATENT, steps=steps, batch_size=128, seed=0,
                                               **DESIGNS[request.param])


def test_samples_of_the_fitted_prior_fall_in_the_clusters_not_between_them(fitted):
    samples = sample_latents(fitted, 400, generator=torch.Generator().manual_seed(1))
    assert samples.shape == (400, 8)
    kind = samples.mean(dim=1)
    # Both kinds, about equally often, each near +-2 on every dimension: the prior N(0, I) would put most
    # draws near 0, the hole.
    assert 0.3 < (kind > 0).float().mean() < 0.7
    assert (kind.abs() > 1.2).float().mean() > 0.9
    assert (samples - 2 * kind.sign()[:, None]).abs().median() < 0.5


def test_the_fitted_state_is_plain_data_and_reproducible(fitted, two_clusters, tmp_path):
    torch.save({"samplers": {"diffusion": fitted}}, tmp_path / "c.pt")
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)["samplers"]["diffusion"]
    draw = lambda state: sample_latents(state, 5, generator=torch.Generator().manual_seed(3))  # noqa: E731
    assert torch.equal(draw(fitted), draw(loaded))
    again = diffusion_prior.fit_diffusion_prior(*two_clusters, LATENT, steps=20, width=16, seed=0)
    once_more = diffusion_prior.fit_diffusion_prior(*two_clusters, LATENT, steps=20, width=16, seed=0)
    assert all(torch.equal(again["network"][k], once_more["network"][k]) for k in again["network"])


def test_sdedit_keeps_a_code_at_strength_zero_and_its_kind_at_low_strength(fitted):
    generator = torch.Generator().manual_seed(2)
    code = torch.full((64, 8), 2.0)  # the + kind
    assert torch.equal(DiffusionPrior(fitted).vary(code, 0.0, generator), code)
    low = DiffusionPrior(fitted).vary(code, 0.3, generator)
    assert (low.mean(dim=1) > 1.0).float().mean() > 0.95, "a little noise, denoised, stays in the photo's cluster"
    assert torch.pdist(low).min() > 0, "and the variations differ"
    free = DiffusionPrior(fitted).vary(code, 1.0, generator).mean(dim=1)
    assert (free < -1.2).any() and (free > 1.2).any(), "at strength 1 the photo is forgotten: both kinds appear"


def test_a_dense_latent_is_modelled_as_a_one_by_one_map():
    means = torch.randn(64, 5)
    for architecture in DESIGNS:
        state = diffusion_prior.fit_diffusion_prior(means, torch.full_like(means, 0.1), (5,), steps=5, width=16,
                                                    num_blocks=1, architecture=architecture)
        assert sample_latents(state, 3, generator=torch.Generator().manual_seed(0)).shape == (3, 5)
        network = diffusion_prior.load_denoiser(state, "cpu")
        assert all(module.kernel_size == (1, 1) for module in network.modules() if isinstance(module, nn.Conv2d))
    assert diffusion_prior.map_shape((5,)) == (5, 1, 1)


@pytest.mark.parametrize("shape, levels", [((8, 8, 8), 2), ((8, 16, 16), 2), ((4, 6, 6), 1), ((4, 5, 5), 0),
                                           ((4, 4, 8), 1)])
def test_the_unet_halves_the_latent_while_it_can_and_keeps_its_shape(shape, levels):
    assert unet_levels(shape[1:]) == levels
    network = UNetDenoiser(shape[0], shape[1:], width=8, num_blocks=1)
    strided = [module for module in network.modules() if isinstance(module, nn.Conv2d) and module.stride == (2, 2)]
    assert len(strided) == levels
    u = torch.randn(3, *shape)
    assert network(u, torch.rand(3)).shape == u.shape
    assert network(u, torch.rand(3)).abs().max() == 0, "its last convolution starts at zero: v = 0 at first"


def test_min_snr_weights_the_v_error_as_the_paper_weights_the_clean_latents_error():
    """Hang et al. weight ||u0_hat - u0||^2 by min(SNR, 5); the v loss with min_snr_weight is the same number."""
    generator = torch.Generator().manual_seed(0)
    a = torch.linspace(0.01, 0.99, 9)[:, None]
    u0, eps, v_hat = (torch.randn(9, 16, generator=generator) for _ in range(3))
    u_t = a.sqrt() * u0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * u0
    u0_hat = a.sqrt() * u_t - (1 - a).sqrt() * v_hat
    snr = a / (1 - a)
    paper = torch.minimum(snr, torch.tensor(5.0)) * (u0_hat - u0).pow(2)
    ours = diffusion_prior.min_snr_weight(a) * (v_hat - v).pow(2)
    assert torch.allclose(paper, ours, atol=1e-5)


@pytest.mark.parametrize("method", diffusion_prior.METHODS)
def test_the_reverse_process_with_an_exact_denoiser_ends_at_the_one_point_it_models(method):
    """For data that is one point c, the exact v is known in closed form at every (u_t, t); every sampler must
    then end at c from any noise (DDIM and DPM-Solver exactly, the ancestral one too: its noise has no effect at
    t = 0)."""
    c = torch.tensor([1.5, -0.5, 0.25]).view(1, 3, 1, 1)

    def exact_v(u, t):
        a = diffusion_prior.signal_level(t)[:, None, None, None]
        eps = (u - a.sqrt() * c) / (1 - a).sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * c
    u = torch.randn(4, 3, 1, 1, generator=torch.Generator().manual_seed(0))
    ended = diffusion_prior.denoise(exact_v, u, diffusion_prior.MAX_T, torch.Generator().manual_seed(1),
                                    method=method)
    assert torch.allclose(ended, c.expand_as(ended), atol=1e-4)


def exact_gaussian_v(variance):
    """The exact v-prediction for data u_0 ~ N(0, variance): E[u_0 | u_t] = sqrt(a) variance u_t / (a variance +
    1 - a), and v = sqrt(a) eps - sqrt(1 - a) u_0 with eps = (u_t - sqrt(a) u_0) / sqrt(1 - a)."""
    def v(u, t):
        a = diffusion_prior.signal_level(t).double()[:, None, None, None]
        u0 = a.sqrt() * variance / (a * variance + 1 - a) * u
        return a.sqrt() * (u - a.sqrt() * u0) / (1 - a).sqrt() - (1 - a).sqrt() * u0
    return v


def test_dpm_solver_follows_the_deterministic_path_to_second_order_where_ddim_follows_it_to_first():
    """For Gaussian data N(0, s^2) the probability-flow ODE that DDIM and DPM-Solver++ solve maps the noise u_T to
    u_T s / sqrt(a_T s^2 + 1 - a_T) in closed form. Both reach it as the steps grow, DDIM's error falling as 1 / n
    and DPM-Solver's as 1 / n^2."""
    variance = 0.09
    u = torch.randn(256, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a_T = diffusion_prior.signal_level(diffusion_prior.MAX_T).double()
    exact = u * math.sqrt(variance) / (a_T * variance + 1 - a_T).sqrt()
    error = {(method, n): (diffusion_prior.denoise(exact_gaussian_v(variance), u, diffusion_prior.MAX_T,
                                                   method=method, steps=n) - exact).abs().max().item()
             for method in ("ddim", "dpm") for n in (25, 100)}
    assert 2.5 < error["ddim", 25] / error["ddim", 100] < 6  # first order: about 4 for 4 times the steps
    assert error["dpm", 25] / error["dpm", 100] > 12  # second order: about 16 or more
    assert error["dpm", 25] < error["ddim", 25] / 4


def test_ancestral_samples_with_an_exact_denoiser_have_the_datas_spread():
    """Standardised latents have unit variance: the ancestral sampler's draws have it too, up to the
    discretisation of its steps, a few percent at 100 and nothing left at 1,000."""
    u = torch.randn(20000, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    spread = {n: diffusion_prior.denoise(exact_gaussian_v(1.0), u, diffusion_prior.MAX_T,
                                         torch.Generator().manual_seed(1), method="ddpm", steps=n).var().item()
              for n in (100, 1000)}
    assert 0.9 < spread[100] < 1.0
    assert spread[1000] == pytest.approx(1.0, abs=0.03)


def recorded_methods(monkeypatch):
    """The (method, steps) of every later call of denoise, recorded as it is called."""
    calls = []
    original = diffusion_prior.denoise

    def recording(*args, method="ddpm", steps=None, **kwargs):
        calls.append((method, steps))
        return original(*args, method=method, steps=steps, **kwargs)
    monkeypatch.setattr(diffusion_prior, "denoise", recording)
    return calls


def test_the_diffusion_prior_samples_and_varies_with_its_fits_method_unless_told_otherwise(monkeypatch):
    state = diffusion_prior.fit_diffusion_prior(torch.randn(16, 2, 4, 4), torch.full((16, 2, 4, 4), 0.1),
                                                (2, 4, 4), steps=2, width=8)
    calls = recorded_methods(monkeypatch)
    prior = DiffusionPrior(state)
    prior.sample(2, generator=torch.Generator().manual_seed(0))
    prior.vary(torch.randn(2, 32), 0.5, torch.Generator().manual_seed(0))
    prior.sample_method, prior.sample_steps = "dpm", 7  # as benchmarks/sampling_steps.py sets them
    prior.sample(2, generator=torch.Generator().manual_seed(0))
    assert calls == [("ddim", None), ("ddim", None), ("dpm", 7)]


def test_checkpoints_fitted_before_the_unet_keep_their_network_and_sampler():
    # A fit made before the U-Net: the flat network, sampled ancestrally, stored with neither choice named.
    state = diffusion_prior.fit_diffusion_prior(torch.randn(16, 2, 4, 4), torch.full((16, 2, 4, 4), 0.1),
                                                (2, 4, 4), steps=2, architecture="flat", width=8)
    state = {key: value for key, value in state.items() if key not in ("architecture", "sampling")}
    prior = DiffusionPrior(state)
    assert prior.method == "ddpm" and type(prior.network("cpu")) is Denoiser  # its weights load into it
    fresh = diffusion_prior.fit_diffusion_prior(torch.randn(16, 2, 4, 4), torch.full((16, 2, 4, 4), 0.1),
                                                (2, 4, 4), steps=2, width=8)
    assert fresh["architecture"] == "unet" and DiffusionPrior(fresh).method == "ddim"


def test_the_gmm_step_leaves_its_component_unchanged():
    generator = torch.Generator().manual_seed(0)
    mean = torch.tensor([3.0, -1.0])
    scale_tril = torch.tensor([[1.0, 0.0], [0.8, 0.5]])
    state = {"kind": "gmm", "weights": torch.ones(1), "means": mean[None], "scale_tril": scale_tril[None]}
    draws = mean + torch.randn(20000, 2, generator=generator) @ scale_tril.T
    assert torch.equal(GaussianMixture(state).vary(draws[:5], 0.0, generator), draws[:5])
    moved = GaussianMixture(state).vary(draws, 0.5, generator)
    # The step is a Markov kernel whose stationary law is the component: the moments stay those of N(mean, LL^T).
    torch.testing.assert_close(moved.mean(0), mean, atol=0.05, rtol=0)
    torch.testing.assert_close(torch.cov(moved.T), scale_tril @ scale_tril.T, atol=0.06, rtol=0)
    rho = diffusion_prior.signal_level(0.5).sqrt().item()
    correlation = torch.corrcoef(torch.stack([draws[:, 0], moved[:, 0]]))[0, 1].item()
    assert correlation == pytest.approx(rho, abs=0.03)  # and it keeps the share rho of the code
    free = GaussianMixture(state).vary(draws, 1.0, generator)
    assert abs(torch.corrcoef(torch.stack([draws[:, 0], free[:, 0]]))[0, 1].item()) < 0.03


def test_the_gmm_step_picks_the_component_a_code_belongs_to():
    generator = torch.Generator().manual_seed(0)
    latents = torch.cat([torch.randn(300, 3, generator=generator) - 5, torch.randn(300, 3, generator=generator) + 5])
    state = fit_gmm(latents, num_components=2, seed=0)
    near_minus = GaussianMixture(state).vary(torch.full((200, 3), -5.0), 0.7, generator)
    assert (near_minus.mean(dim=1) < 0).all()


def test_pooled_pairwise_rmse_by_hand():
    black, white = torch.zeros(1, 3, 16, 16), torch.ones(1, 3, 16, 16)
    half = torch.cat([torch.zeros(1, 3, 16, 8), torch.ones(1, 3, 16, 8)], dim=3)
    # Pairs: black-white 1, black-half sqrt(1/2), white-half sqrt(1/2); pooling to 8x8 keeps these halves.
    expected = (1 + 2 * math.sqrt(0.5)) / 3
    assert mean_pairwise_rmse(torch.cat([black, white, half])) == pytest.approx(expected)
    # Pixel noise that averages out over each 2x2 block (a checkerboard) is invisible to the measure.
    checker = (torch.arange(16)[:, None] + torch.arange(16)[None]) % 2
    noisy = (0.5 + 0.2 * (checker * 2 - 1)).expand(1, 3, 16, 16)
    assert mean_pairwise_rmse(torch.cat([noisy, torch.full((1, 3, 16, 16), 0.5)])) == pytest.approx(0, abs=1e-7)
    spread, pairs = same_class_pairwise_rmse(torch.cat([black, white, half]), [1, 1, 2])
    assert (spread, pairs) == (pytest.approx(1.0), 1)
    assert same_class_pairwise_rmse(torch.cat([black, white]), [1, 2]) == (None, 0)


def test_the_species_classifier_learns_separable_features():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat_interleave(40)
    features = torch.randn(120, 16, generator=generator) + 4 * torch.nn.functional.one_hot(labels, 16)
    predict = fit_species_classifier(features.numpy(), labels.numpy() + 1)
    fresh = torch.randn(30, 16, generator=generator) + 4 * torch.nn.functional.one_hot(labels[::4], 16)
    assert (predict(fresh.numpy()) == labels[::4].numpy() + 1).mean() > 0.9
