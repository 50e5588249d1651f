"""The training options: KL schedules, likelihood-matched decoders, BatchNorm and collapse diagnostics."""

import math

import pytest
import torch

from datasets.batches import ImageBatches
from vae.config import TrainConfig
from vae.losses import ELBOLoss
from vae.metrics import active_units
from vae.schedules import KLSchedule
from vae.likelihoods import MIN_LOG_SIGMA
from vae.vae import VAE, build_model
from vae.evaluation import evaluate
from vae.training import make_kl_schedule, make_optimizer


def test_constant_and_linear_weights_at_known_steps():
    assert KLSchedule("constant", beta=0.1)(12345) == 0.1
    linear = KLSchedule("linear", beta=0.5, warmup_steps=100)
    assert [linear(s) for s in (0, 25, 50, 100, 1000)] == pytest.approx([0, 0.125, 0.25, 0.5, 0.5])


def test_sigmoid_warmup_is_centred_and_reaches_beta():
    sigmoid = KLSchedule("sigmoid", beta=1.0, warmup_steps=100)
    assert sigmoid(50) == pytest.approx(0.5)
    assert sigmoid(0) < 0.01 and 0.99 < sigmoid(99) < 1 and sigmoid(100) == 1.0
    assert all(sigmoid(s) <= sigmoid(s + 1) for s in range(120))


def test_cyclical_schedule_follows_fu_et_al():
    # 400 steps, 4 cycles of 100, rising over the first half of each cycle.
    cyclical = KLSchedule("cyclical", beta=0.2, total_steps=400, cycles=4, ratio=0.5)
    assert [cyclical(s) for s in (0, 25, 50, 75, 99, 100, 125, 350, 399)] == \
        pytest.approx([0, 0.1, 0.2, 0.2, 0.2, 0, 0.1, 0.2, 0.2])


def test_schedule_lengths_come_from_epochs_so_a_resumed_run_has_the_same_schedule():
    config = TrainConfig(kl_schedule="cyclical", epochs=10, kl_cycles=2, beta=1.0)
    schedule = make_kl_schedule(config, steps_per_epoch=15)
    assert schedule.total_steps == 150 and schedule(75) == 0.0 and schedule(37) == pytest.approx(37 / 37.5)
    rebuilt = make_kl_schedule(config, steps_per_epoch=15)  # what a resume builds: the schedule is not state
    assert [rebuilt(s) for s in range(150)] == [schedule(s) for s in range(150)]
    assert make_kl_schedule(TrainConfig(kl_schedule="linear", kl_warmup_epochs=2), 15).warmup_steps == 30


@pytest.mark.parametrize("likelihood", ["gaussian", "gaussian-learned", "bernoulli"])
def test_each_likelihood_has_its_decoder_sigma(likelihood):
    model = VAE(likelihood=likelihood)
    sigma = model.likelihood.shared_sigma()
    if likelihood == "bernoulli":
        assert sigma is None
    else:
        assert sigma == pytest.approx(1 / math.sqrt(2), abs=1e-6)
    # The learned sigma is the likelihood's own parameter.
    learned = "likelihood.raw_log_sigma" in dict(model.named_parameters())
    assert learned == (likelihood == "gaussian-learned")
    assert len(list(model.likelihood.parameters())) == int(learned)


def test_learned_sigma_has_a_floor_and_learns():
    model = VAE(likelihood="gaussian-learned")
    with torch.no_grad():
        model.likelihood.raw_log_sigma.fill_(-50.0)
    assert model.likelihood.log_scale().item() >= MIN_LOG_SIGMA
    torch.manual_seed(0)
    model = VAE((16, 16), channels=(8, 16), likelihood="gaussian-learned")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.rand(16, 3, 16, 16) * 0.2 + 0.4
    loss_fn = ELBOLoss(1.0, model.likelihood)  # the model's own likelihood: its sigma is the one trained
    for _ in range(100):
        total = loss_fn(x, *model(x))[3]
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    assert model.likelihood.shared_sigma() < 0.5  # moved well below its start of 0.71 towards the error scale


def test_collapsed_model_is_reported_by_the_diagnostics():
    torch.manual_seed(0)
    model = build_model(TrainConfig(latent_size=6))
    with torch.no_grad():  # posterior = prior for every image: the textbook posterior collapse
        model.encoder.mean.weight.zero_()
        model.encoder.mean.bias.zero_()
        model.encoder.log_var.weight.zero_()
        model.encoder.log_var.bias.zero_()
    images = (torch.rand(40, 3, 32, 32) * 255).to(torch.uint8)
    metrics = evaluate(model, ImageBatches(images, 16, "cpu", shuffle=False), beta=0.1)
    assert metrics["active_units"] == 0
    assert metrics["kl_nats"] == pytest.approx(0.0, abs=1e-6) and max(metrics["kl_per_dim"]) < 1e-6
    assert metrics["posterior_std"] == pytest.approx(1.0)
    healthy = evaluate(build_model(TrainConfig(latent_size=6)), ImageBatches(images, 16, "cpu", shuffle=False), 0.1)
    assert healthy["kl_nats"] > 0


def test_active_units_counts_exactly_the_dimensions_in_use():
    means = torch.zeros(200, 8)
    means[:, [1, 4, 6]] = torch.randn(200, 3)  # three dimensions vary with the image
    means[:, 0] = 0.05 * torch.randn(200)        # variance 0.0025: below the 0.01 threshold
    assert active_units(means.flatten(1).var(dim=0)) == 3


def test_batch_norm_models_evaluate_with_running_statistics():
    torch.manual_seed(0)
    model = VAE(batch_norm=True)
    images = (torch.rand(16, 3, 32, 32) * 255).to(torch.uint8)
    batches = ImageBatches(images, 8, "cpu", shuffle=False)
    before = [m.running_mean.clone() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    evaluate(model, batches, beta=0.1)
    after = [m.running_mean for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert model.training  # evaluate puts the mode back


def test_a_config_file_sets_flags_and_the_command_line_overrides_it(tmp_path):
    from vae_training import parse_args

    recipe = tmp_path / "recipe.json"
    recipe.write_text('{"likelihood": "gaussian-learned", "batch-norm": true, "beta": 1.0}')
    config, _, explicit = parse_args(["--config", str(recipe), "--beta", "0.5"])
    assert (config.likelihood, config.batch_norm, config.beta, config.latent_size) == ("gaussian-learned", True, 0.5, 10)
    recipe.write_text('{"channels": [8, 16, 32], "batch-norm": false, "epochs": 3}')
    config, _, _ = parse_args(["--config", str(recipe)])
    assert (config.channels, config.batch_norm, config.epochs) == ([8, 16, 32], False, 3)
    assert {"likelihood", "batch_norm", "beta"} <= explicit
    for bad in ('{"latent-sise": 3}', '{"likelihood": "gausian"}', '{"latent-size": "ten"}', '[1, 2]',
                '{"epochs": 1.7}', '{"batch-norm": "no"}', '{"beta": [0.1]}', '{"channels": {"a": 1}}'):
        recipe.write_text(bad)
        with pytest.raises(SystemExit):
            parse_args(["--config", str(recipe)])


def test_learned_sigma_trains_the_elbo_itself_unless_beta_is_given():
    from vae_training import parse_args

    assert parse_args(["--likelihood", "gaussian-learned"])[0].beta == 1.0
    assert parse_args(["--likelihood", "gaussian-learned", "--beta", "0.5"])[0].beta == 0.5
    assert parse_args([])[0].beta == 0.1


def test_the_learned_sigma_has_its_own_learning_rate():
    config = TrainConfig(likelihood="gaussian-learned", lr=1e-4, sigma_lr=1e-2)
    model = build_model(config)
    optimizer = make_optimizer(model, config)
    assert [group["lr"] for group in optimizer.param_groups] == [1e-4, 1e-2]
    assert optimizer.param_groups[1]["params"] == [model.likelihood.raw_log_sigma]
    assert len(make_optimizer(build_model(TrainConfig()), TrainConfig()).param_groups) == 1


@pytest.mark.parametrize("field, value, flag", [("sigma", 0.0, "--sigma"), ("free_bits", -1.0, "--free-bits"),
                                                ("kl_ratio", 5.0, "--kl-ratio"), ("kl_cycles", 0, "--kl-cycles")])
def test_impossible_option_values_name_their_flag(field, value, flag):
    from vae.errors import UserError
    from vae.config import validate_config

    with pytest.raises(UserError, match=flag):
        validate_config(TrainConfig(**{field: value}))
    with pytest.raises(UserError, match=flag):
        validate_config(TrainConfig(likelihood="gaussian-learned", **{field: value}))
