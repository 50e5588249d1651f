"""The training practice a recipe turns on, each through vae_training.main in this process: a residual model
with a spatial latent and the logistic likelihood, joined splits, flips, EMA, LR warm-up and cosine decay,
gradient clipping, exact resume of all of it, and the latent samplers stored at the end."""

import math

import pytest
import torch

from conftest import TINY, train
from datasets.batches import ImageBatches
from vae import inference
from vae.config import TrainConfig
from vae.evaluation import evaluate
from vae.fitting import make_ema
from vae.training import Optimization, TrainState, make_lr_schedule, train_one_epoch
from vae.losses import ELBOLoss
from vae.trained import load_model
from vae.vae import VAE

RESNET = ["--arch", "resnet", "--width", "8", "--latent-shape", "4", "4", "4", "--likelihood", "logistic",
          "--beta", "1", "--lr", "1e-3"]
PRACTICE = ["--split", "train+val", "--holdout", "0.2", "--hflip", "--ema", "0.9", "--lr-schedule", "cosine",
            "--lr-warmup-epochs", "1", "--grad-clip", "50", "--diffusion-prior-steps", "20",
            "--kind-prior-steps", "15", "--kind-code-noise", "0.5"]


@pytest.fixture(scope="module")
def recipe_runs(flowers_root, tmp_path_factory):
    """The same recipe run 3 epochs straight and 1 + 2 epochs resumed (40 train+val images, 8 held out)."""
    log_dir = tmp_path_factory.mktemp("recipe")
    common = ["--data-dir", flowers_root, "--log-dir", log_dir, *TINY, *RESNET, *PRACTICE]
    train(*common, "--epochs", 3, "--run-name", "straight")
    train(*common, "--epochs", 1, "--run-name", "resumed")
    train("--resume", log_dir / "resumed" / "checkpoint.pt", "--epochs", 3)
    return {name: torch.load(log_dir / name / "checkpoint.pt", weights_only=True) for name in ("straight", "resumed")}


@pytest.mark.slow  # three whole runs of the recipe (the fixture)
def test_the_whole_recipe_resumes_bit_for_bit(recipe_runs):
    straight, resumed = recipe_runs["straight"], recipe_runs["resumed"]
    assert straight["step"] == resumed["step"] == 3 * 4  # 32 of 40 train+val images, batch 8
    for key in ("model", "ema_model"):
        for name, tensor in straight[key].items():
            assert torch.equal(tensor, resumed[key][name]), (key, name)
    assert straight["schedule"] == resumed["schedule"] and straight["schedule"]["last_epoch"] == 12  # the lr schedule
    assert straight["config"]["split"] == "train+val" and straight["config"]["latent_shape"] == [4, 4, 4]


@pytest.mark.slow  # three whole runs of the recipe (the fixture)
def test_ema_weights_differ_from_the_trained_ones_and_inference_uses_them(recipe_runs, tmp_path):
    checkpoint = recipe_runs["straight"]
    weight = "decoder.output.weight"
    assert not torch.equal(checkpoint["model"][weight], checkpoint["ema_model"][weight])
    path = tmp_path / "c.pt"
    torch.save(checkpoint, path)
    model = load_model(path, "cpu").model
    assert torch.equal(model.state_dict()["decoder.output.weight"], checkpoint["ema_model"]["decoder.output.weight"])


@pytest.mark.slow  # three whole runs of the recipe (the fixture)
def test_a_finished_run_stores_a_gmm_the_diffusion_prior_and_the_kind_sampler(recipe_runs, tmp_path):
    gmm = recipe_runs["straight"]["samplers"]["gmm"]
    assert gmm["kind"] == "gmm" and gmm["means"].shape[1] == 4 * 4 * 4
    assert gmm["weights"].sum().item() == pytest.approx(1.0, abs=1e-5)
    prior = recipe_runs["straight"]["samplers"]["diffusion"]
    assert prior["kind"] == "diffusion" and prior["latent_shape"] == [4, 4, 4] and prior["steps"] == 20
    path = tmp_path / "c.pt"
    torch.save(recipe_runs["straight"], path)
    kind = recipe_runs["straight"]["samplers"]["kind"]  # fitted with the diffusion prior, with its own settings
    assert kind["kind"] == "kind" and kind["latent_shape"] == [4, 4, 4] and kind["steps"] == 15
    assert kind["code_noise"] == 0.5
    trained = load_model(path, "cpu")
    assert trained.best_sampler() == "kind" and inference.variation_mode(trained.samplers) == "kind"
    generator = torch.Generator().manual_seed(0)
    for name in ("diffusion", "kind"):
        images, z = inference.sample_images(trained.model, trained.samplers[name], 3, 1.0, generator)
        assert images.shape == (3, 3, 32, 32) and z.shape == (3, 4, 4, 4)


def test_learning_rate_warms_up_then_follows_the_cosine_to_zero():
    config = TrainConfig(lr=0.1, epochs=10, lr_warmup_epochs=2, lr_schedule="cosine")
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=config.lr)
    schedule = make_lr_schedule(config, optimizer, steps_per_epoch=5)  # 10 warm-up steps of 50
    rates = []
    for _ in range(50):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[0] == pytest.approx(0.01) and rates[9] == pytest.approx(0.1)
    assert rates[30] == pytest.approx(0.05 * (1 + math.cos(math.pi * 20 / 40)))
    assert rates[49] < 0.001 and all(a >= b for a, b in zip(rates[10:], rates[11:]))


def test_gradient_clipping_bounds_the_update():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8)
    changes = {}
    for clip in (0.0, 1.0):
        torch.manual_seed(0)
        model = VAE((8, 8), latent_size=2, channels=[4])
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        optimization = Optimization(model, TrainConfig(grad_clip=clip), steps_per_epoch=1)
        # Plain SGD at lr 1 instead of Adam, so that the step's length is the (clipped) gradient norm.
        optimization.optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        optimization.lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimization.optimizer, lambda step: 1.0)
        losses = train_one_epoch(model, ImageBatches(images, 8, "cpu", shuffle=False), ELBOLoss(), optimization,
                                 TrainState(), progress=False)
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        changes[clip] = ((after - before).norm().item(), losses["grad_norm"])
    unclipped_step, gradient_norm = changes[0.0]
    assert unclipped_step == pytest.approx(gradient_norm, rel=1e-4) and gradient_norm > 1
    assert changes[1.0][0] == pytest.approx(1.0, rel=1e-4)  # an SGD step of lr 1 moves by the clipped norm


def test_flips_are_seeded_per_epoch_about_half_and_only_mirror_images():
    images = torch.arange(64 * 3 * 2 * 2, dtype=torch.uint8).view(64, 3, 2, 2)
    batches = ImageBatches(images, 64, "cpu", seed=3, hflip=True)
    first, again = next(batches.epoch(0)), next(batches.epoch(0))
    assert torch.equal(first, again)
    order = batches.indices(0)
    plain = images[order].float() / 255
    flipped = (first != plain).flatten(1).any(dim=1)
    assert 16 < flipped.sum() < 48
    assert torch.equal(first[flipped], plain[flipped].flip(-1))
    resumed = torch.cat(list(ImageBatches(images, 16, "cpu", seed=3, hflip=True).epoch(0, start_batch=2)))
    assert torch.equal(resumed, first[32:])


def test_logistic_bits_per_dim_are_its_own_negative_elbo_on_8_bit_pixels():
    torch.manual_seed(0)
    model = VAE((8, 8), arch="resnet", width=4, latent_shape=(2, 2, 2), likelihood="logistic")
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    metrics = evaluate(model, ImageBatches(images, 3, "cpu", shuffle=False), iw_samples=1,
                       generator=torch.Generator().manual_seed(0))
    assert metrics["decoder_sigma"] is None and "logistic" in metrics["bits_per_dim_note"]
    assert metrics["bits_per_dim"] == pytest.approx(metrics["iwae_nll_nats"] / (192 * math.log(2)), rel=1e-6)
    assert metrics["neg_elbo_bits_per_dim"] == pytest.approx(metrics["neg_elbo_nats"] / (192 * math.log(2)),
                                                             rel=1e-6)


def test_ema_follows_its_warm_up_recurrence_and_copies_counters():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = make_ema(model, 0.5)
    expected = {name: value.clone() for name, value in model.state_dict().items()}
    for n in range(4):  # update n (n >= 1) moves by 1 - min(decay, (1 + n) / (10 + n)); update 0 copies
        with torch.no_grad():
            model[0].weight.add_(1.0)
        model(torch.randn(4, 2))  # train mode: moves the running statistics and counts the batch
        ema.update_parameters(model)
        rate = 1.0 if n == 0 else 1 - min(0.5, (1 + n) / (10 + n))
        for name, value in model.state_dict().items():
            if value.is_floating_point():
                expected[name] = expected[name] + rate * (value - expected[name])
            else:
                expected[name] = value.clone()
    for name, value in ema.module.state_dict().items():
        assert torch.allclose(value, expected[name], atol=1e-6), name
    assert ema.module[1].num_batches_tracked.item() == 4


def test_batch_norm_with_ema_trains(flowers_root, tmp_path):
    train("--data-dir", flowers_root, "--batch-norm", "--ema", "0.9", "--epochs", 1, "--log-dir", tmp_path,
          "--run-name", "bn", *TINY)
    checkpoint = torch.load(tmp_path / "bn" / "checkpoint.pt", weights_only=True)
    counter = next(name for name in checkpoint["model"] if name.endswith("num_batches_tracked"))
    assert checkpoint["ema_model"][counter] == checkpoint["model"][counter] == 4
