"""Every checkpoint read goes through one validation: damaged settings, weights and samplers each end in one line
that names the file and the problem, in the inference CLI, in training's --resume and on the page, before any
memory is allocated for what the file describes. Each case builds its damaged file from the shipped model."""

import copy

import pytest
import torch

import vae_demo
from conftest import REPO, error_line
from vae_inference import main as inference_main
from vae_training import main as training_main

SHIPPED = REPO / "pretrained" / "flowers32.pt"


@pytest.fixture(scope="module")
def shipped():
    return torch.load(SHIPPED, weights_only=True)


def _first(weights):
    return next(iter(weights.values()))


# name: (how the checkpoint is damaged, words the error must hold)
DAMAGES = {
    "latent size 0": (lambda c: c["config"].update(latent_size=0, latent_shape=None), "--latent-size must be"),
    "resolution 7": (lambda c: c["config"].update(resolution=7), "--resolution must be a positive multiple of 8"),
    "resolution as text": (lambda c: c["config"].update(resolution="32"), "setting resolution is '32', not an"),
    "unknown likelihood": (lambda c: c["config"].update(likelihood="foo"), "unknown likelihood 'foo'"),
    "negative channels": (lambda c: c["config"].update(stage_channels=[-48, 64]), "--stage-channels needs one "
                                                                                  "positive number"),
    "config as a list": (lambda c: c.update(config=[1, 2]), "its config is a list"),
    "model as a list": (lambda c: c.update(model=[1, 2]), "its model is a list"),
    "format version as text": (lambda c: c.update(format_version="3"), "format_version is '3', not a whole"),
    "width of three million": (lambda c: c["config"].update(width=3_000_000, stage_channels=None),
                               "must be at most 4096"),
    "width as a float": (lambda c: c["config"].update(width=3e6), "setting width is 3000000.0, not an integer"),
    "a weight of the wrong shape": (lambda c: c["model"].update({next(iter(c["model"])): torch.zeros(2, 2)}),
                                    "does not fit the model its config describes"),
    "NaN weights": (lambda c: _first(c["model"]).fill_(float("nan")), "holds NaN or infinite values"),
    "GMM without weights": (lambda c: c["samplers"]["gmm"].pop("weights"), "gmm sampler does not fit this model"),
    "GMM means of the wrong size": (lambda c: c["samplers"]["gmm"].update(means=c["samplers"]["gmm"]["means"][:, :9]),
                                    "gmm sampler does not fit this model"),
    "negative GMM weights": (lambda c: c["samplers"]["gmm"]["weights"].neg_(), "gmm sampler does not fit"),
    "NaN GMM means": (lambda c: c["samplers"]["gmm"]["means"].fill_(float("nan")),
                      "gmm sampler holds NaN or infinite values in 'means'"),
    "a denoiser of the wrong shape": (lambda c: c["samplers"]["diffusion"]["network"].update(
        {name: value[:1] for name, value in list(c["samplers"]["diffusion"]["network"].items())[:1]}),
        "diffusion sampler does not fit this model"),
    "a sampler stored under another name": (lambda c: c["samplers"].update(gmm=c["samplers"]["diffusion"]),
                                            "is not a stored gmm sampler"),
    "kind codes of the wrong size": (lambda c: c["samplers"]["kind"].update(code_directions=torch.zeros(3, 5)),
                                     "code directions of shape (3, 5)"),
}


def damaged(shipped, tmp_path, how):
    checkpoint = copy.deepcopy(shipped)
    how(checkpoint)
    path = tmp_path / "damaged.pt"
    torch.save(checkpoint, path)
    return path


def fails(capsys, main, *args):
    capsys.readouterr()
    code = main([str(a) for a in args])
    assert code == 2
    return error_line(capsys.readouterr().err)


@pytest.mark.parametrize("case", DAMAGES)
def test_a_damaged_checkpoint_is_one_line_naming_the_file_and_the_problem(shipped, tmp_path, capsys, case):
    how, words = DAMAGES[case]
    path = damaged(shipped, tmp_path, how)
    out = tmp_path / "samples.png"
    line = fails(capsys, inference_main, "sample", "--checkpoint", path, "--num", 2, "--out", out)
    assert str(path) in line and words in line, line
    assert not out.exists()


def test_the_page_refuses_a_damaged_checkpoint_with_the_same_line(shipped, tmp_path, capsys):
    path = damaged(shipped, tmp_path, DAMAGES["NaN GMM means"][0])
    line = fails(capsys, vae_demo.main, "--checkpoint", path, "--port", 1)
    assert str(path) in line and "gmm sampler holds NaN" in line, line


def test_resuming_a_damaged_checkpoint_is_refused_before_its_model_is_built(shipped, tmp_path, capsys):
    """--resume reads the file through the same validation: a width of three million (324 TB of weights) and NaN
    weights are refused in one line, not allocated or trained on."""
    for case in ("width of three million", "NaN weights"):
        checkpoint = copy.deepcopy(shipped)
        checkpoint.update(optimizer={}, schedule={}, rng={}, batch=0)  # what an export leaves out
        DAMAGES[case][0](checkpoint)
        path = tmp_path / "run" / "checkpoint.pt"
        path.parent.mkdir(exist_ok=True)
        torch.save(checkpoint, path)
        line = fails(capsys, training_main, "--resume", path, "--data-dir", tmp_path)
        assert str(path) in line and DAMAGES[case][1] in line, line


def test_the_shipped_checkpoints_pass_the_validation():
    from vae.trained import load_model

    for name in ("flowers32.pt", "flowers64.pt"):
        trained = load_model(REPO / "pretrained" / name, "cpu")
        assert "diffusion" in trained.samplers
