"""No flag in its range allocates more than a machine has: grids too large are refused before any work, many
images are made a chunk at a time (and the same as in one batch), and samplers that need more training images
than a run will have are refused before it trains."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY
from vae import inference
from vae.samplers import Prior
from vae.trained import load_model
from vae_inference import main as inference_main
from vae_training import main as training_main


@pytest.mark.parametrize("command", [
    ["traverse", "--walk", "latent", "--dims", "0", "--steps", "1000"],  # 10 rows of 1,000 images at 96x96
    ["sample", "--num", "10000", "--scale", "3"],  # the largest --num, at 92 megapixels
    ["sample", "--num", "5000"],  # in range, but 46 megapixels at the default scale
])
def test_a_grid_too_large_is_refused_before_any_work(checkpoint, tmp_path, capsys, command):
    out = tmp_path / "grid.png"
    assert inference_main([*command, "--checkpoint", str(checkpoint), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "megapixels, more than the 40 a grid may have" in error and "--scale" in error, error
    assert not out.exists()


def test_a_grid_within_the_limit_is_made_in_chunks_like_one_batch(checkpoint, tmp_path, monkeypatch):
    model = load_model(checkpoint, "cpu").model
    z = torch.randn(7, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = model.decode(z)
    monkeypatch.setattr(inference, "CHUNK", 3)  # 7 images: chunks of 3, 3 and 1
    assert torch.allclose(inference.decode(model, z), whole, atol=1e-5)
    images, latents = inference.sample_images(model, Prior.of_size(model.latent_size), 7, 1.0,
                                              torch.Generator().manual_seed(0))
    assert images.shape == (7, 3, *model.image_resolution) and latents.shape == (7, *model.latent_shape)
    photos = torch.stack([torch.zeros(3, *model.image_resolution), torch.ones(3, *model.image_resolution)])
    varied, latents, means = inference.variations(model, photos, 4, 0.01, torch.Generator().manual_seed(2),
                                                  mode="posterior")
    assert varied.shape == (8, 3, *model.image_resolution) and len(means) == 2
    # Each photo's four variations are drawn around its own code, across the chunk boundaries. Strength 0.01 draws
    # them at about 0.01 of the posterior's spread: the small model trained for the tests can put a black and a white
    # photo's means close (at 0.1 one variation once lay 0.39 from its own mean and 0.31 from the other's).
    spread = (latents.flatten(1) - means.flatten(1).repeat_interleave(4, dim=0)).norm(dim=1)
    across = (latents.flatten(1) - means.flatten(1).flip(0).repeat_interleave(4, dim=0)).norm(dim=1)
    assert (spread < across).all()
    # Through the CLI, a traversal of every dimension (more images than one chunk) is one grid of them all.
    out = tmp_path / "traverse.png"
    assert inference_main(["traverse", "--checkpoint", str(checkpoint), "--walk", "latent", "--dims", "0",
                           "--steps", "2", "--scale", "1", "--out", str(out)]) == 0
    assert Image.open(out).size == (2 * 34 + 2, model.latent_size * 34 + 2)


def test_samplers_fitted_after_training_refuse_too_few_images_at_the_start(tmp_path, capsys):
    photos = tmp_path / "two"
    photos.mkdir()
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
            photos / f"{i}.png")
    log_dir = tmp_path / "runs"
    code = training_main(["--data-dir", str(photos), "--holdout", "0.5", "--log-dir", str(log_dir), "--epochs", "1",
                          *TINY, "--batch-size", "1"])
    assert code == 2
    error = capsys.readouterr().err
    assert "the gmm sampler is fitted to the training images and needs at least 2, but there would be 1" in error
    assert "lower --holdout" in error
    assert not log_dir.exists() or not any(log_dir.iterdir())  # refused before a run folder was made
