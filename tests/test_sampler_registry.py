"""A sampler is one class and its registration: a sampler defined here, in the test, is fitted by export, draws
samples, varies a photo, and shows in --help and on the page, with no file of the project edited."""

import pytest
import torch

import vae_demo
from vae import samplers
from vae.samplers import Sampler, keep_rate, register
from vae.trained import load_model
from vae_inference import build_parser, main


class DiagonalGaussian(Sampler):
    """N(mu, diag(sigma^2)) of the training images' posterior means: a Gaussian fit of the aggregate posterior."""

    name = "diagonal"
    description = "a diagonal Gaussian fitted to the posterior means"
    rank = 40

    @classmethod
    def fit(cls, posteriors, seed=0, steps=None, device="cpu", progress=False):
        means = posteriors.means
        return cls({"kind": cls.name, "mean": means.mean(0), "std": means.std(0)})

    def sample(self, num, temperature=1.0, generator=None):
        eps = torch.randn(num, len(self.state["mean"]), generator=generator)
        return self.state["mean"] + temperature * self.state["std"] * eps

    def vary(self, latents, strength, generator=None):
        rho = keep_rate(strength)
        fresh = self.sample(len(latents), 1.0, generator).to(latents.device)
        mean = self.state["mean"].to(latents.device)
        return mean + rho * (latents - mean) + (1 - rho ** 2) ** 0.5 * (fresh - mean)


@pytest.fixture
def flower_files(flowers_root):
    return sorted((flowers_root / "flowers-102" / "jpg").glob("*.jpg"))


@pytest.fixture
def registered():
    register(DiagonalGaussian)
    yield DiagonalGaussian
    del samplers.SAMPLERS[DiagonalGaussian.name]


@pytest.fixture
def exported(registered, checkpoint, flowers_root, tmp_path):
    path = tmp_path / "with-diagonal.pt"
    assert main(["export", "--checkpoint", str(checkpoint), "--fit-samplers", "diagonal", "--data-dir",
                 str(flowers_root), "--out", str(path)]) == 0
    return path


def help_text(command):
    parser = build_parser()
    subcommands = next(action for action in parser._actions if action.dest == "command")
    return " ".join(subcommands.choices[command].format_help().split())  # unwrapped


def test_a_registered_sampler_is_a_choice_of_every_command_that_takes_one(registered):
    assert "diagonal" in help_text("sample") and registered.description in help_text("sample")
    assert "diagonal" in help_text("variations") and "diagonal" in help_text("evaluate")
    assert "diagonal" in help_text("export")  # a kind --fit-samplers fits


def test_a_registered_sampler_fits_samples_and_varies_through_the_cli(exported, flower_files, tmp_path, capsys):
    stored = torch.load(exported, weights_only=True)["samplers"]["diagonal"]  # plain tensors
    assert stored["kind"] == "diagonal" and stored["mean"].shape == (10,)
    capsys.readouterr()
    assert main(["sample", "--checkpoint", str(exported), "--sampler", "diagonal", "--num", "4", "--out",
                 str(tmp_path / "s.png")]) == 0
    assert "diagonal samples" in capsys.readouterr().out
    assert main(["variations", "--checkpoint", str(exported), "--mode", "diagonal", "--images", str(flower_files[0]),
                 "--num", "3", "--out", str(tmp_path / "v.png")]) == 0
    assert "3 diagonal variations" in capsys.readouterr().out
    trained = load_model(exported, "cpu")
    draws = trained.sampler("diagonal").sample(4000, generator=torch.Generator().manual_seed(0))
    # The fit is the moments of the posterior means, and its draws have them.
    torch.testing.assert_close(draws.mean(0), stored["mean"], atol=0.1 * stored["std"].max().item(), rtol=0)


def test_a_registered_sampler_is_offered_on_the_page(exported, flower_files):
    page = vae_demo.Demo(exported, torch.device("cpu"), scale=1)
    assert "diagonal" in page.samplers and "diagonal" in page.modes
    images, message, _ = page.samples("diagonal", 3, 1.0, 0, True)
    assert message == "" and len(images) == 3
    _, _, varied, message, _ = page.variations(str(flower_files[0]), "diagonal", 2, 0.5, 0, True)
    assert message == "" and len(varied) == 2


def test_without_its_class_a_checkpoint_names_the_unknown_sampler(exported, tmp_path, capsys):
    del samplers.SAMPLERS["diagonal"]
    try:
        assert main(["sample", "--checkpoint", str(exported), "--out", str(tmp_path / "s.png")]) == 2
        assert "unknown sampler 'diagonal'" in capsys.readouterr().err
    finally:
        register(DiagonalGaussian)


def test_export_drops_the_samplers_it_is_told_to(exported, tmp_path, capsys):
    slim = tmp_path / "slim.pt"
    assert set(torch.load(exported, weights_only=True)["samplers"]) == {"gmm", "diagonal"}
    assert main(["export", "--checkpoint", str(exported), "--drop-samplers", "gmm", "--out", str(slim)]) == 0
    assert set(torch.load(slim, weights_only=True)["samplers"]) == {"diagonal"}
    assert main(["export", "--checkpoint", str(slim), "--drop-samplers", "gmm", "--out", str(tmp_path / "x.pt")]) == 2
    assert "--drop-samplers gmm: " in capsys.readouterr().err and not (tmp_path / "x.pt").exists()


def test_a_training_run_fits_a_gmm_at_its_end_only_where_its_covariances_are_small():
    from vae.config import TrainConfig

    small = TrainConfig(arch="resnet", latent_shape=[8, 8, 8])  # 512 dims: 4 MB of covariances
    large = TrainConfig(arch="resnet", latent_shape=[8, 16, 16])  # 2,048 dims: 67 MB, more than the model
    assert "gmm" in samplers.fitted_after_training(small)
    assert "gmm" not in samplers.fitted_after_training(large)
    assert "gmm" in samplers.fitted_after_training(TrainConfig())  # the tutorial's 10 numbers


@pytest.mark.parametrize("name", sorted(samplers.SAMPLERS))
def test_the_settings_export_writes_for_a_fit_are_those_a_training_run_reads_back(name):
    """config_of is after_training's inverse: the settings export writes into a checkpoint's config for a fit are
    those under which a training run fits that sampler with the same keywords, so that the config says how its
    sampler was fitted whichever of the two fitted it."""
    import dataclasses

    from vae.config import TrainConfig

    sampler = samplers.SAMPLERS[name]
    run = TrainConfig(arch="resnet", latent_shape=[8, 8, 8], diffusion_prior_steps=100, kind_prior_steps=700,
                      kind_code_noise=0.5)
    fitted = sampler.after_training(run)
    if fitted is None:  # no run fits it, and export writes no setting for it
        assert sampler.config_of({}) == {}
        return
    written = sampler.config_of(fitted)
    assert {key: getattr(run, key) for key in written} == written
    # Other settings, written for other keywords, are read back as those keywords.
    other = {key: value * 3 for key, value in written.items()}
    rerun = dataclasses.replace(run, **other)
    assert sampler.config_of(sampler.after_training(rerun)) == other
    assert sampler.after_training(rerun) != fitted or not other
