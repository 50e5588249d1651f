"""The loss terms against independent computations (torch.distributions, Monte Carlo, hand arithmetic)."""

import math

import pytest
import torch
from torch.distributions import Bernoulli, Independent, Normal, kl_divergence as torch_kl

from vae.likelihoods import (LIKELIHOODS, MIN_LOG_SCALE, TUTORIAL_SIGMA, Likelihood, discretized_logistic_log_probs,
                             discretized_logistic_nll, gaussian_nll_from_sse, make_likelihood, register)
from vae.losses import ELBOLoss, kl_divergence, kl_per_dimension


def test_closed_form_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mean, log_var = torch.randn(6, 4), torch.randn(6, 4)
    q = Independent(Normal(mean, (0.5 * log_var).exp()), 1)
    p = Independent(Normal(torch.zeros(4), torch.ones(4)), 1)
    assert torch.allclose(kl_divergence(mean, log_var), torch_kl(q, p), atol=1e-5)


def test_closed_form_kl_matches_monte_carlo():
    torch.manual_seed(0)
    mean, log_var = torch.tensor([[0.7, -1.2]]), torch.tensor([[-0.5, 0.8]])
    q = Normal(mean, (0.5 * log_var).exp())
    z = q.sample((400_000,))
    monte_carlo = (q.log_prob(z) - Normal(0.0, 1.0).log_prob(z)).sum(-1).mean()
    assert kl_divergence(mean, log_var).item() == pytest.approx(monte_carlo.item(), abs=0.01)


def test_seed_loss_is_sum_of_squared_error_plus_beta_kl_by_hand():
    x = torch.tensor([[[[0.0, 1.0], [0.5, 0.25]]]])          # one 1x2x2 image
    reconstruction = torch.tensor([[[[0.5, 0.5], [0.5, 0.5]]]])
    mean, log_var = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, math.log(2.0)]])
    beta, kl, rec, total = ELBOLoss(0.1)(x, reconstruction, mean, log_var)
    sse = 0.25 + 0.25 + 0.0 + 0.0625
    kl_by_hand = 0.5 * (1 + 1 - 1 - 0) + 0.5 * (0 + 2 - 1 - math.log(2.0))
    assert beta == 0.1
    assert rec.item() == pytest.approx(sse)
    assert kl.item() == pytest.approx(kl_by_hand)
    assert total.item() == pytest.approx(0.1 * kl_by_hand + sse)


def test_losses_average_over_the_batch():
    x, r = torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
    r[0] = 1.0  # image 0 has SSE 48, image 1 has 0
    mean = torch.zeros(2, 2)
    _, kl, rec, _ = ELBOLoss()(x, r, mean, mean)
    assert rec.item() == pytest.approx(24.0) and kl.item() == 0


@pytest.mark.parametrize("sigma", [TUTORIAL_SIGMA, 0.1, 2.0])
def test_gaussian_nll_matches_torch_distributions(sigma):
    torch.manual_seed(1)
    x, r = torch.rand(3, 3, 4, 4), torch.rand(3, 3, 4, 4)
    expected = -Independent(Normal(r, sigma), 3).log_prob(x)
    # The Gaussians' parameters are the mean itself; sigma is the likelihood's own.
    assert torch.allclose(make_likelihood("gaussian", sigma).nll(x, r), expected, atol=1e-4)
    assert torch.allclose(make_likelihood("gaussian-learned", sigma).nll(x, r), expected, atol=1e-4)
    # The trained fixed-sigma term drops only the constant D * log(sigma * sqrt(2 pi)).
    constant = 48 * math.log(sigma * math.sqrt(2 * math.pi))
    assert torch.allclose(make_likelihood("gaussian", sigma).loss(x, r) + constant, expected, atol=1e-4)
    sse = (x - r).pow(2).flatten(1).sum(1)
    assert torch.allclose(gaussian_nll_from_sse(sse, math.log(sigma), 48), expected, atol=1e-4)


def test_bernoulli_matches_torch_distributions_on_binary_pixels():
    torch.manual_seed(2)
    x = (torch.rand(2, 3, 4, 4) > 0.5).float()
    p = torch.rand(2, 3, 4, 4).clamp(0.01, 0.99)
    expected = -Independent(Bernoulli(probs=p), 3).log_prob(x)
    assert torch.allclose(make_likelihood("bernoulli").loss(x, p), expected, atol=1e-4)
    assert torch.allclose(make_likelihood("bernoulli").nll(x, p), expected, atol=1e-4)
    assert make_likelihood("bernoulli").log_likelihood_8bit(x, p) is None
    assert "no bits/dim" in make_likelihood("bernoulli").no_bits_per_dim


def test_free_bits_floor_each_dimension_in_the_loss_but_kl_is_reported_raw():
    x = torch.zeros(2, 3, 8, 8)
    mean = torch.tensor([[0.1, 2.0], [0.1, 2.0]])  # dimension 0 has KL 0.005, dimension 1 has KL 2
    log_var = torch.zeros(2, 2)
    _, kl, rec, total = ELBOLoss(beta=1.0, free_bits=0.5)(x, x, mean, log_var)
    assert kl.item() == pytest.approx(0.005 + 2.0)
    assert total.item() == pytest.approx(0.5 + 2.0)
    raw_dims = kl_per_dimension(mean, log_var).mean(0)
    assert raw_dims.tolist() == pytest.approx([0.005, 2.0])


def test_learned_sigma_gets_a_gradient_towards_the_error_scale():
    x, r = torch.zeros(4, 3, 8, 8), torch.full((4, 3, 8, 8), 0.1)
    likelihood = make_likelihood("gaussian-learned", sigma=1.0)
    ELBOLoss(1.0, likelihood)(x, r, torch.zeros(4, 2), torch.zeros(4, 2))[3].backward()
    assert likelihood.raw_log_sigma.grad > 0  # sigma 1 is far above the 0.1 error: the loss wants it smaller


def test_kl_of_a_spatial_latent_is_flattened_per_dimension():
    torch.manual_seed(3)
    mean, log_var = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    per_dimension = kl_per_dimension(mean, log_var)
    assert per_dimension.shape == (2, 36)
    assert torch.allclose(per_dimension, kl_per_dimension(mean.flatten(1), log_var.flatten(1)))
    assert torch.allclose(kl_divergence(mean, log_var), per_dimension.sum(dim=1))


# ------------------------------------------------------------------------------ discretized logistic

LEVELS = torch.arange(256, dtype=torch.float64) / 255


def _logistic_probability_by_hand(x, mean, log_scale):
    """P(x) of one 8-bit pixel in float64, written out as a difference of logistic CDFs (sigmoids)."""
    scale = math.exp(log_scale)
    cdf = lambda t: 1 / (1 + math.exp(-(t - mean) / scale))  # P(X < t)
    upper_tail = lambda t: 1 / (1 + math.exp((t - mean) / scale))  # P(X > t) = 1 - cdf(t), without cancelling
    lower_edge, upper_edge = x - 0.5 / 255, x + 0.5 / 255
    if x == 0:
        return cdf(upper_edge)
    if x == 1:
        return upper_tail(lower_edge)
    if x > mean:  # both CDFs are near 1 there: subtract the small upper tails instead
        return upper_tail(lower_edge) - upper_tail(upper_edge)
    return cdf(upper_edge) - cdf(lower_edge)


@pytest.mark.parametrize("mean, log_scale", [(0.5, -3.0), (0.0, MIN_LOG_SCALE), (1.0, MIN_LOG_SCALE), (0.3, 0.0),
                                             (0.7, 2.0), (0.123, -5.5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logistic_probabilities_of_the_256_levels_sum_to_one(mean, log_scale, dtype):
    log_probs = discretized_logistic_log_probs(LEVELS.to(dtype), torch.tensor(mean, dtype=dtype),
                                               torch.tensor(log_scale, dtype=dtype))
    assert torch.isfinite(log_probs).all()
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    assert torch.logsumexp(log_probs.double(), dim=0).item() == pytest.approx(0.0, abs=tolerance)


def test_logistic_matches_an_independent_float64_computation():
    cases = [(0.0, 0.4, -2.0), (3 / 255, 0.0, -4.0), (128 / 255, 0.5, -6.0), (1.0, 0.9, -1.5), (250 / 255, 0.2, -3.0),
             (0.5, 0.0, MIN_LOG_SCALE), (17 / 255, 0.8, -5.0)]  # the last two: far out in the tails
    x, mean, log_scale = (torch.tensor(column, dtype=torch.float64) for column in zip(*cases))
    expected = torch.tensor([math.log(_logistic_probability_by_hand(*case)) for case in cases], dtype=torch.float64)
    assert torch.allclose(discretized_logistic_log_probs(x, mean, log_scale), expected, rtol=1e-9)
    # float32 keeps about 6 digits of each log-probability, tails included.
    assert torch.allclose(discretized_logistic_log_probs(x.float(), mean.float(), log_scale.float()).double(),
                          expected, rtol=1e-5)


def test_logistic_nll_is_the_loss_and_the_nll_per_image():
    torch.manual_seed(4)
    x = torch.randint(0, 256, (2, 3, 4, 4)) / 255
    maps = torch.randn(2, 6, 4, 4) * 2  # the decoder's: the means' logits, then the raw log scales
    logistic = make_likelihood("logistic")
    parameters = logistic(maps)
    mean, log_scale = logistic.mean_and_log_scale(parameters)
    assert torch.equal(mean, torch.sigmoid(maps[:, :3])) and torch.equal(logistic.mean(parameters), mean)
    assert torch.equal(log_scale, MIN_LOG_SCALE + torch.nn.functional.softplus(maps[:, 3:] - MIN_LOG_SCALE))
    expected = -discretized_logistic_log_probs(x, mean, log_scale).flatten(1).sum(dim=1)
    assert expected.shape == (2,)
    assert torch.equal(discretized_logistic_nll(x, mean, log_scale), expected)
    assert torch.equal(logistic.loss(x, parameters), expected)
    assert torch.equal(logistic.nll(x, parameters), expected)
    assert torch.allclose(logistic.log_likelihood_8bit(x, parameters), -expected.double(), rtol=1e-6)
    latent = torch.zeros(2, 5)
    _, kl, reconstruction, total = ELBOLoss(0.5, "logistic")(x, parameters, latent, latent)
    assert reconstruction.item() == pytest.approx(expected.mean().item()) and total.item() == pytest.approx(
        expected.mean().item())
    with pytest.raises(ValueError, match="per-pixel log scale"):  # an image is not the logistic's parameters
        ELBOLoss(0.5, "logistic")(x, mean, latent, latent)


def test_logistic_stays_finite_with_finite_gradients_at_the_extremes():
    x = torch.tensor([0.0, 1 / 255, 0.5, 254 / 255, 1.0]).repeat(4)
    mean = torch.tensor([0.0, 1.0]).repeat_interleave(10).requires_grad_()
    log_scale = torch.tensor([MIN_LOG_SCALE, 3.0]).repeat_interleave(5).repeat(2).requires_grad_()
    log_probs = discretized_logistic_log_probs(x, mean, log_scale)
    assert torch.isfinite(log_probs).all()
    # A pixel at 1 under a mean of 0 and scale e^-7 is ~1100 scales out: very unlikely, but not impossible.
    assert log_probs.min() < -1000
    log_probs.sum().backward()
    assert torch.isfinite(mean.grad).all() and torch.isfinite(log_scale.grad).all()
    assert (log_scale.grad != 0).any() and (mean.grad != 0).any()


# ------------------------------------------------------------------------------ likelihoods as objects

def test_elbo_loss_takes_a_likelihood_object_or_its_name_with_the_same_numbers():
    torch.manual_seed(5)
    x, r = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8)
    mean, log_var = torch.randn(4, 6), torch.randn(4, 6)
    for name in LIKELIHOODS:
        parameters = make_likelihood(name)(torch.randn(4, make_likelihood(name).output_channels(3), 8, 8))
        by_name = ELBOLoss(0.3, name)(x, parameters, mean, log_var)
        by_object = ELBOLoss(0.3, make_likelihood(name))(x, parameters, mean, log_var)
        assert [v.item() if torch.is_tensor(v) else v for v in by_name] == [
            v.item() if torch.is_tensor(v) else v for v in by_object]
    # The tutorial's loss, written out: SSE + beta * KL.
    _, kl, rec, total = ELBOLoss(0.3)(x, r, mean, log_var)
    sse = (x - r).pow(2).sum() / 4
    kl_by_hand = 0.5 * (mean.pow(2) + log_var.exp() - 1 - log_var).sum() / 4
    assert rec.item() == pytest.approx(sse.item(), rel=1e-6) and kl.item() == pytest.approx(kl_by_hand.item(), rel=1e-6)
    assert total.item() == pytest.approx(0.3 * kl_by_hand.item() + sse.item(), rel=1e-6)


def test_an_unknown_likelihood_names_the_choices():
    with pytest.raises(ValueError, match="unknown likelihood 'laplace'; use one of gaussian, gaussian-learned"):
        make_likelihood("laplace")


def test_adding_a_likelihood_is_one_class_and_its_registration(tmp_path):
    """A Laplace likelihood with a fixed scale: registered, it trains, evaluates and has a --likelihood flag."""
    from datasets.batches import ImageBatches
    from vae.config import TrainConfig, build_parser
    from vae.evaluation import evaluate
    from vae.vae import VAE

    @register
    class Laplace(Likelihood):
        name = "laplace-test"
        help = "a fixed-scale Laplace"

        def __init__(self, sigma=None):
            super().__init__()

        def nll(self, x, parameters):
            return torch.distributions.Laplace(parameters, 0.1).log_prob(x).neg().flatten(1).sum(dim=1)

    try:
        model = VAE(likelihood="laplace-test")
        x = torch.rand(2, 3, 32, 32)
        parameters, mean, log_var = model(x, return_parameters=True)
        total = ELBOLoss(1.0, model.likelihood)(x, parameters, mean, log_var)[3]
        total.backward()
        assert torch.isfinite(total)
        assert "laplace-test" in build_parser(TrainConfig).format_help()
        images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
        metrics = evaluate(model, ImageBatches(images, 2, "cpu", shuffle=False))
        assert metrics["likelihood"] == "laplace-test" and math.isfinite(metrics["neg_elbo_nats"])
        assert metrics["bits_per_dim"] is None and "laplace-test likelihood defines no" in metrics["bits_per_dim_note"]
    finally:
        del LIKELIHOODS["laplace-test"]
