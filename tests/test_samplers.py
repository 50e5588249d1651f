"""Latent samplers: the GMM recovers a known mixture, sampling is reproducible and torch-only, states save
with weights_only, and the two-stage VAE learns a non-Gaussian latent distribution."""

import io

import pytest
import torch

from vae.samplers import Prior, fit_gmm, fit_two_stage, sample_latents

MEANS = torch.tensor([[-4.0, 0.0, 1.0], [4.0, 1.0, -1.0], [0.0, 5.0, 3.0]])
WEIGHTS = torch.tensor([0.5, 0.3, 0.2])


def _known_mixture(num, seed=0):
    generator = torch.Generator().manual_seed(seed)
    component = torch.multinomial(WEIGHTS, num, replacement=True, generator=generator)
    scales = torch.tensor([0.5, 1.0, 0.7])[component, None]
    return MEANS[component] + scales * torch.randn(num, 3, generator=generator)


def _round_trip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.fixture(scope="module")
def gmm():
    return fit_gmm(_known_mixture(3000), num_components=3, seed=0)


def test_gmm_recovers_the_means_and_weights_of_a_known_mixture(gmm):
    assert gmm["means"].shape == (3, 3) and gmm["scale_tril"].shape == (3, 3, 3) and gmm["weights"].shape == (3,)
    # Match each true component to the nearest fitted one (EM's order is arbitrary).
    nearest = torch.cdist(MEANS, gmm["means"]).argmin(dim=1)
    assert sorted(nearest.tolist()) == [0, 1, 2]
    assert torch.allclose(gmm["means"][nearest], MEANS, atol=0.15)
    assert torch.allclose(gmm["weights"][nearest], WEIGHTS, atol=0.03)
    covariances = gmm["scale_tril"] @ gmm["scale_tril"].transpose(1, 2)
    assert torch.allclose(covariances[nearest[0]], 0.25 * torch.eye(3), atol=0.05)


def test_gmm_samples_reproduce_with_the_same_generator_and_follow_the_mixture(gmm):
    first = sample_latents(gmm, 4000, generator=torch.Generator().manual_seed(1))
    again = sample_latents(gmm, 4000, generator=torch.Generator().manual_seed(1))
    other = sample_latents(gmm, 4000, generator=torch.Generator().manual_seed(2))
    assert first.shape == (4000, 3) and first.dtype == torch.float32
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert torch.allclose(first.mean(0), WEIGHTS @ MEANS, atol=0.15)


def test_temperature_zero_gives_the_component_means(gmm):
    samples = sample_latents(gmm, 200, temperature=0.0, generator=torch.Generator().manual_seed(0))
    distance_to_nearest_mean = torch.cdist(samples, gmm["means"]).min(dim=1).values
    assert distance_to_nearest_mean.max() == 0


@pytest.mark.parametrize("covariance", ["diag", "spherical", "tied"])
def test_every_covariance_type_becomes_a_cholesky_factor(covariance):
    state = fit_gmm(_known_mixture(600), num_components=3, covariance=covariance)
    assert state["scale_tril"].shape == (3, 3, 3)
    assert torch.equal(state["scale_tril"], state["scale_tril"].tril())
    assert sample_latents(state, 10).shape == (10, 3)


def test_prior_sampler_has_the_temperature_as_its_scale():
    samples = sample_latents(Prior.of_size(8).state, 20000, temperature=0.5, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (20000, 8)
    assert samples.std().item() == pytest.approx(0.5, rel=0.02)


def _two_clusters_in_8d(num, seed):
    """A non-Gaussian latent set far from N(0, I): two elongated clusters off the origin."""
    generator = torch.Generator().manual_seed(seed)
    side = torch.randint(2, (num, 1), generator=generator).float() * 2 - 1
    centre = torch.tensor([3.0, 1.0, -2.0, 0.5, 0.0, 1.0, 2.0, -1.0])
    direction = torch.tensor([1.0, -1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0]) / 2
    scales = torch.tensor([0.3, 0.3, 1.5, 0.2, 0.3, 0.8, 0.3, 0.3])
    return centre + 2.5 * side * direction + scales * torch.randn(num, 8, generator=generator), centre, direction


@pytest.fixture(scope="module")
def two_stage():
    latents, _, _ = _two_clusters_in_8d(2000, seed=0)
    return fit_two_stage(latents, hidden_size=128, steps=1000, seed=0)


@pytest.mark.slow  # trains the two-stage VAE
def test_two_stage_sampler_matches_the_latent_distribution_far_better_than_the_prior(two_stage):
    data, centre, direction = _two_clusters_in_8d(4000, seed=1)
    samples = sample_latents(two_stage, 4000, generator=torch.Generator().manual_seed(0))
    prior = sample_latents(Prior.of_size(8).state, 4000, generator=torch.Generator().manual_seed(0))

    def moment_errors(x):
        return (x.mean(0) - data.mean(0)).norm().item(), (torch.cov(x.T) - torch.cov(data.T)).norm().item()

    mean_error, covariance_error = moment_errors(samples)
    prior_mean_error, prior_covariance_error = moment_errors(prior)
    assert mean_error < 0.1 * prior_mean_error
    assert covariance_error < 0.4 * prior_covariance_error
    # Bimodal like the data: few samples fall midway between the clusters, where a Gaussian fit puts its peak.
    along = (samples - centre) @ direction / direction.norm()
    assert (along.abs() < 0.5).float().mean() < 0.15
    assert 0.35 < (along > 0).float().mean() < 0.65


@pytest.mark.slow  # trains the two-stage VAE
def test_two_stage_sampler_reproduces_survives_weights_only_load_and_leaves_global_rng_alone(two_stage):
    loaded = _round_trip(two_stage)
    assert loaded["kind"] == "two-stage"
    first = sample_latents(two_stage, 50, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, sample_latents(loaded, 50, generator=torch.Generator().manual_seed(3)))
    latents = torch.randn(64, 4)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    fit_two_stage(latents, hidden_size=8, steps=3)
    assert torch.equal(torch.rand(3), expected)


def test_gmm_state_survives_torch_save_and_weights_only_load(gmm):
    loaded = _round_trip(gmm)
    assert loaded.keys() == gmm.keys()
    first = sample_latents(gmm, 50, generator=torch.Generator().manual_seed(4))
    assert torch.equal(first, sample_latents(loaded, 50, generator=torch.Generator().manual_seed(4)))


def test_samplers_fit_the_shapes_the_model_uses():
    latents = torch.randn(40, 6)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        fit_gmm(latents.reshape(40, 2, 3), num_components=2)
    with pytest.raises(ValueError, match="at least"):
        fit_gmm(latents[:2], num_components=3)
