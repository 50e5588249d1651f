"""A likelihood whose parameters are neither a mean nor a mean and a scale: a two-component discretized mixture of
logistics (PixelCNN++'s, without its coupling of the colour channels), added the way a user adds one: a class,
registered by @register's function, with no other file changed. It trains, evaluates and reports bits/dim, and its
probabilities are checked against a computation by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from datasets.preprocessing import ImageBatches
from vae.likelihoods import (INITIAL_LOG_SCALE, LIKELIHOODS, MIN_LOG_SCALE, Likelihood, discretized_logistic_log_probs,
                             register, soft_floor)
from vae.losses import ELBOLoss
from vae.evaluation import evaluate
from vae.training import step_loss
from vae.vae import VAE

COMPONENTS = 2
NAME = "logistic-mixture-test"


class LogisticMixture(Likelihood):
    """Per pixel and channel, sum_k w_k * DiscretizedLogistic(m_k, s_k). Its parameters are the decoder's maps in
    float32, three groups of COMPONENTS * C maps: the weights' logits, the means' logits, the raw log scales."""

    name = NAME
    help = "two-component discretized mixture of logistics"
    maps_per_channel = 3 * COMPONENTS
    discretized = f"mixture of {COMPONENTS} logistics"
    no_bits_per_dim = None

    def __init__(self, sigma=None):
        super().__init__()

    def initialize(self, layer):
        with torch.no_grad():
            layer.bias[2 * layer.out_channels // 3:] = INITIAL_LOG_SCALE

    def forward(self, maps):
        return maps.float()

    def components(self, parameters):
        """(log weights, means, log scales), each (batch, COMPONENTS, C, H, W)."""
        batch, maps, height, width = parameters.shape
        groups = parameters.view(batch, 3, COMPONENTS, maps // (3 * COMPONENTS), height, width)
        logits, means, log_scales = groups.unbind(dim=1)
        return F.log_softmax(logits, dim=1), torch.sigmoid(means), soft_floor(log_scales, MIN_LOG_SCALE)

    def mean(self, parameters):
        log_weights, means, _ = self.components(parameters)
        return (log_weights.exp() * means).sum(dim=1)

    def log_probs(self, x, parameters):
        """log P(x) of each pixel and channel (nats), shape of x."""
        log_weights, means, log_scales = self.components(parameters)
        return torch.logsumexp(log_weights + discretized_logistic_log_probs(x.unsqueeze(1), means, log_scales), dim=1)

    def nll(self, x, parameters):
        return -self.log_probs(x, parameters).flatten(1).sum(dim=1)

    def log_likelihood_8bit(self, x, parameters):
        return -self.nll(x.double(), parameters.double())


@pytest.fixture
def mixture():
    register(LogisticMixture)
    try:
        yield LIKELIHOODS[NAME]
    finally:
        del LIKELIHOODS[NAME]


def _probability_by_hand(level, log_weights, means, scales):
    """P(level / 255) under the mixture, written out as weighted differences of logistic CDFs, in float64."""
    x = level / 255
    total = 0.0
    for log_weight, mean, scale in zip(log_weights, means, scales):
        cdf = lambda t: 1 / (1 + math.exp(-(t - mean) / scale))
        upper = 1.0 if level == 255 else cdf(x + 0.5 / 255)
        lower = 0.0 if level == 0 else cdf(x - 0.5 / 255)
        total += math.exp(log_weight) * (upper - lower)
    return total


def test_the_mixtures_256_probabilities_sum_to_one_and_match_a_computation_by_hand(mixture):
    torch.manual_seed(0)
    likelihood = mixture()
    maps = torch.randn(1, 3 * COMPONENTS, 1, 2) * 2  # one channel, two pixels
    maps[:, 2 * COMPONENTS:] -= 2  # scales of about a tenth: the bins' masses differ
    maps = maps.double()  # float32 values, as forward makes them, so the computation by hand starts from the same
    levels = torch.arange(256, dtype=torch.float64)
    x = (levels / 255).view(256, 1, 1, 1).expand(256, 1, 1, 2)  # image k: both pixels at level k
    log_probs = likelihood.log_probs(x, likelihood(maps).double().expand(256, -1, -1, -1))
    assert log_probs.shape == (256, 1, 1, 2) and torch.isfinite(log_probs).all()
    torch.testing.assert_close(torch.logsumexp(log_probs, dim=0), torch.zeros(1, 1, 2, dtype=torch.float64),
                               rtol=0, atol=1e-12)
    for pixel in range(2):
        log_weights = F.log_softmax(maps[0, :COMPONENTS, 0, pixel], dim=0).tolist()
        means = torch.sigmoid(maps[0, COMPONENTS:2 * COMPONENTS, 0, pixel]).tolist()
        scales = soft_floor(maps[0, 2 * COMPONENTS:, 0, pixel], MIN_LOG_SCALE).exp().tolist()
        for level in (0, 1, 77, 128, 200, 254, 255):
            expected = _probability_by_hand(level, log_weights, means, scales)
            assert log_probs[level, 0, 0, pixel].exp().item() == pytest.approx(expected, rel=1e-9)
    # The image it shows is the mixture's weighted mean of the components' means.
    image = likelihood.mean(likelihood(maps))
    by_hand = [sum(math.exp(w) * m for w, m in zip(F.log_softmax(maps[0, :COMPONENTS, 0, p], 0).tolist(),
                                                    torch.sigmoid(maps[0, COMPONENTS:2 * COMPONENTS, 0, p]).tolist()))
               for p in range(2)]
    assert image.flatten().tolist() == pytest.approx(by_hand, rel=1e-6)  # computed in float32


def test_a_model_with_the_mixture_trains_evaluates_and_reports_bits_per_dim(mixture):
    from vae.config import TrainConfig, build_parser

    torch.manual_seed(0)
    model = VAE((8, 8), latent_size=3, channels=[8], likelihood=NAME)
    assert model.decoder.output_layer.out_channels == 3 * 3 * COMPONENTS
    # Smooth 8-bit images (blow-ups of 2x2 noise): something to learn.
    coarse = torch.rand(4, 3, 2, 2)
    images = torch.round(F.interpolate(coarse, size=8, mode="bilinear") * 255).to(torch.uint8)
    x = images.float() / 255
    loss_fn = ELBOLoss(1.0, model.likelihood)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    totals = []
    for step in range(20):
        total = step_loss(model, x, loss_fn)[2]
        optimizer.zero_grad()
        total.backward()
        if step == 0:
            for name, parameter in model.named_parameters():
                assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
                assert parameter.grad.abs().sum() > 0, name
        optimizer.step()
        totals.append(total.item())
    assert all(math.isfinite(total) for total in totals)
    assert totals[-1] < totals[0]
    uniform_nats = x[0].numel() * math.log(256)
    assert totals[0] < 1.5 * uniform_nats  # its log scales start at the width of uniform pixels

    metrics = evaluate(model, ImageBatches(images, 2, "cpu", shuffle=False), beta=1.0, iw_samples=3,
                       generator=torch.Generator().manual_seed(0))
    assert metrics["likelihood"] == NAME and metrics["num_images"] == 4
    assert 0 < metrics["bits_per_dim"] < 16 and math.isfinite(metrics["neg_elbo_bits_per_dim"])
    assert metrics["bits_per_dim"] == pytest.approx(metrics["iwae_nll_8bit_nats"] / (3 * 8 * 8 * math.log(2)))
    assert f"mixture of {COMPONENTS} logistics discretized to 256 levels" in metrics["bits_per_dim_note"]
    # A distribution over 8-bit pixels: its model likelihood is the 8-bit one.
    assert metrics["reconstruction_nats"] == pytest.approx(metrics["reconstruction_8bit_nats"], rel=1e-5)
    assert NAME in build_parser(TrainConfig).format_help()
