"""Measurements against hand computations: the discretized likelihoods behind bits/dim, active units."""

import math

import pytest
import torch

from vae.likelihoods import discretized_gaussian_log_likelihood, make_likelihood
from vae.metrics import active_units, bits_per_dim


def _sigmoid(t):
    return 1 / (1 + math.exp(-t))


def _logistic_parameters(mean, log_scale):
    """The logistic likelihood's parameters (the decoder's maps) that give these means and floored log scales."""
    from vae.likelihoods import MIN_LOG_SCALE
    raw_log_scale = MIN_LOG_SCALE + torch.log(torch.expm1(log_scale - MIN_LOG_SCALE))  # the soft floor's inverse
    return torch.cat([torch.logit(mean), raw_log_scale], dim=1)


def test_logistic_bits_per_dim_by_hand():
    # One image of two pixels: 0 (the open-ended bottom bin) and 128/255 (an inner bin).
    x = torch.tensor([[[[0.0, 128 / 255]]]], dtype=torch.float64)  # float32 would round 128/255 at 1e-8
    mean = torch.tensor([[[[0.1, 0.5]]]], dtype=torch.float64)
    log_scale = torch.tensor([[[[-2.0, -3.0]]]], dtype=torch.float64)
    logistic = make_likelihood("logistic")
    parameters = _logistic_parameters(mean, log_scale)
    torch.testing.assert_close(logistic.mean_and_log_scale(parameters), (mean, log_scale), rtol=1e-12, atol=0)
    p_first = _sigmoid((0.5 / 255 - 0.1) / math.exp(-2.0))
    p_second = _sigmoid((128.5 / 255 - 0.5) / math.exp(-3.0)) - _sigmoid((127.5 / 255 - 0.5) / math.exp(-3.0))
    expected_bits = -(math.log2(p_first) + math.log2(p_second)) / 2
    log_likelihood = logistic.log_likelihood_8bit(x, parameters)
    assert log_likelihood.shape == (1,) and log_likelihood.dtype == torch.float64
    assert bits_per_dim(-log_likelihood, 2).item() == pytest.approx(expected_bits, rel=1e-9)


def test_logistic_evaluation_is_the_training_loss():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (3, 3, 8, 8)) / 255
    parameters = torch.randn(3, 6, 8, 8) * 3
    logistic = make_likelihood("logistic")
    evaluated = logistic.log_likelihood_8bit(x, parameters)
    assert torch.allclose(evaluated, -logistic.loss(x, parameters).double(), rtol=1e-6)
    # Its model likelihood and its 8-bit likelihood are one computation.
    model_term, eight_bit = logistic.log_likelihoods(x, parameters)
    assert model_term is eight_bit and torch.equal(model_term, evaluated)


def test_gaussian_likelihoods_use_the_discretized_gaussian_and_bernoulli_has_none():
    torch.manual_seed(1)
    x, mean = torch.randint(0, 256, (2, 3, 4, 4)) / 255, torch.rand(2, 3, 4, 4)
    sigma = 0.2
    expected = discretized_gaussian_log_likelihood(x, mean, math.log(sigma))
    for likelihood in ("gaussian", "gaussian-learned"):  # the mean is their parameters; sigma their own
        torch.testing.assert_close(make_likelihood(likelihood, sigma).log_likelihood_8bit(x, mean), expected)
    assert make_likelihood("bernoulli").log_likelihood_8bit(x, mean) is None


def test_active_units_of_a_spatial_latent_count_each_position():
    torch.manual_seed(2)
    means = torch.zeros(100, 2, 2, 2)
    means[:, 0, 1, 0] = torch.randn(100)  # one channel at one position varies across images
    means[:, 1] = torch.randn(100, 2, 2) * 0.01  # the rest barely does (variance 1e-4 < 0.01)
    assert active_units(means.flatten(1).var(dim=0)) == 1
