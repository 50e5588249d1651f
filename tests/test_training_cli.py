"""vae_training.py run the way a user runs it: through the command line, on a small Flowers102 root."""

import pytest
import torch

from conftest import load_events, run_script

pytestmark = pytest.mark.slow


def run_training(*args, check=True):
    result = run_script("vae_training.py", *args)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def tiny_run(flowers_root, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("runs")
    result = run_training("--data-dir", flowers_root, "--epochs", 3, "--batch-size", 8, "--log-dir", log_dir,
                          "--run-name", "tiny", "--grid-size", 4, "--num-workers", 1)
    return log_dir / "tiny", result


def test_help_shows_the_seeds_defaults():
    help_text = run_training("--help").stdout
    entries = {entry.split()[0].rstrip(","): " ".join(entry.split()) for entry in help_text.split("\n  --")[1:]}
    for flag, default in [("data-dir", "datasets"), ("split", "train"), ("resolution", "32"), ("latent-size", "10"),
                          ("beta", "0.1"), ("lr", "0.0001"), ("batch-size", "64"), ("epochs", "500"),
                          ("log-dir", "runs"), ("device", "auto"), ("seed", "0"), ("max-steps", "0")]:
        assert f"(default: {default})" in entries[flag], entries[flag]
    for flag in ("run-name", "num-workers", "batch-norm", "eval-split", "holdout"):
        assert flag in entries


def test_run_logs_the_seeds_scalars_grids_and_evaluation(tiny_run):
    run_dir, result = tiny_run
    assert "epoch 3/3" in result.stdout
    # add_scalars("loss", {...}) writes one sub-run per curve, each with the tag "loss".
    for curve in ("KL Loss", "Reconstruction Loss", "Total Loss"):
        events = load_events(run_dir / f"loss_{curve}")
        steps = [event.step for event in events.Scalars("loss")]
        assert steps == list(range(1, 13))  # 32 images / batch 8 = 4 steps per epoch, 3 epochs
    events = load_events(run_dir)
    tags = events.Tags()
    assert {"originals", "reconstructions", "samples"} <= set(tags["images"])
    # Per-epoch logs share the global-step axis of the losses; train/epoch maps steps to epochs.
    assert [e.step for e in events.Images("samples")] == [4, 8, 12]
    assert [(e.step, e.value) for e in events.Scalars("train/epoch")] == [(4, 1), (8, 2), (12, 3)]
    image = events.Images("reconstructions")[-1]
    assert (image.width, image.height) == (2 * 32 + 3 * 2, 2 * 32 + 3 * 2)  # a 2x2 grid, 2-pixel padding
    for tag in ("eval/kl_nats", "eval/reconstruction_nats", "eval/loss", "eval/neg_elbo_nats", "eval/active_units",
                "train/grad_norm", "train/images_per_s"):
        assert tag in tags["scalars"], tag
        assert len(events.Scalars(tag)) == 3
    # The tutorial's run has a constant KL weight and learning rate and a fixed sigma: settings, not flat curves.
    assert not {"train/kl_weight", "train/lr", "train/decoder_sigma"} & set(tags["scalars"])
    assert "eval/kl_per_dim" in tags["histograms"]


def test_run_writes_a_plain_checkpoint(tiny_run):
    run_dir, _ = tiny_run
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "schedule", "rng", "epoch", "step", "config", "versions", "git_sha",
            "format_version"} <= set(checkpoint)
    assert checkpoint["epoch"] == 3 and checkpoint["step"] == 12
    assert checkpoint["config"]["latent_size"] == 10 and checkpoint["config"]["resolution"] == 32
    assert not any(key.startswith(("module.", "_orig_mod.")) for key in checkpoint["model"])
    assert (run_dir / "best.pt").is_file() and (run_dir / "run.json").is_file()
    assert not list(run_dir.glob("*.tmp*"))


def test_max_steps_stops_a_smoke_run_early(flowers_root, tmp_path):
    run_training("--data-dir", flowers_root, "--epochs", 50, "--batch-size", 8, "--max-steps", 2,
                 "--log-dir", tmp_path, "--run-name", "smoke", "--eval-split", "none", "--grid-size", 4)
    checkpoint = torch.load(tmp_path / "smoke" / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 2 and checkpoint["epoch"] == 0 and checkpoint["batch"] == 2


def test_kind_prior_steps_alone_fits_the_kind_sampler_at_the_end(flowers_root, tmp_path):
    """--kind-prior-steps without --diffusion-prior-steps: the run fits the kind sampler (and the GMM), not the
    diffusion prior, and its config reads back as that fit."""
    run_training("--data-dir", flowers_root, "--epochs", 1, "--batch-size", 8, "--kind-prior-steps", 5,
                 "--kind-code-noise", 0.5, "--log-dir", tmp_path, "--run-name", "k", "--eval-split", "none",
                 "--grid-size", 4, "--num-workers", 1)
    checkpoint = torch.load(tmp_path / "k" / "checkpoint.pt", weights_only=True)
    assert "kind" in checkpoint["samplers"] and "diffusion" not in checkpoint["samplers"]
    kind = checkpoint["samplers"]["kind"]
    assert kind["steps"] == 5 and kind["code_noise"] == 0.5
    assert checkpoint["config"]["kind_prior_steps"] == 5 and checkpoint["config"]["diffusion_prior_steps"] == 0


def test_same_seed_same_parameters_other_seed_differs(flowers_root, tmp_path):
    def final_parameters(name, seed):
        # One thread for all three: floating-point sums depend on the thread count, which the default would
        # choose by timing, differently on a busy machine.
        run_training("--data-dir", flowers_root, "--epochs", 1, "--batch-size", 8, "--seed", seed, "--log-dir",
                     tmp_path, "--run-name", name, "--eval-split", "none", "--grid-size", 4, "--num-workers", 1,
                     "--threads", 1)
        return torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)["model"]
    first, second, other = final_parameters("a", 7), final_parameters("b", 7), final_parameters("c", 8)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_holdout_evaluates_on_images_carved_from_the_training_split(flowers_root, tmp_path):
    result = run_training("--data-dir", flowers_root, "--split", "train", "--holdout", 0.25, "--epochs", 1,
                          "--batch-size", 8, "--log-dir", tmp_path, "--run-name", "h", "--grid-size", 4)
    assert "training on 24 images" in result.stdout and "evaluating on 8" in result.stdout


def test_64x64_run_builds_the_deeper_model(flowers_root, tmp_path):
    run_training("--data-dir", flowers_root, "--resolution", 64, "--epochs", 1, "--batch-size", 16,
                 "--log-dir", tmp_path, "--run-name", "r64", "--grid-size", 4)
    checkpoint = torch.load(tmp_path / "r64" / "checkpoint.pt", weights_only=True)
    assert checkpoint["model"]["encoder.mean.weight"].shape == (10, 128 * 4 * 4)
    events = load_events(tmp_path / "r64")
    image = events.Images("samples")[-1]
    assert image.width == 2 * 64 + 3 * 2


def test_a_new_run_never_overwrites_an_existing_one(tiny_run, flowers_root):
    run_dir, _ = tiny_run
    before = (run_dir / "checkpoint.pt").read_bytes()
    result = run_training("--data-dir", flowers_root, "--epochs", 1, "--log-dir", run_dir.parent, "--run-name",
                          run_dir.name, check=False)
    assert result.returncode == 2 and "--resume auto" in result.stderr and "Traceback" not in result.stderr
    assert (run_dir / "checkpoint.pt").read_bytes() == before


def test_a_long_run_writes_about_thirty_frames_of_each_grid():
    from vae_training import writes_grids

    for epochs in (3, 100, 500, 5000):
        frames = [epoch for epoch in range(epochs) if writes_grids(epoch, epochs)]
        assert frames[:min(5, epochs)] == list(range(min(5, epochs))) and frames[-1] == epochs - 1
        assert len(frames) <= 31 and (epochs < 31 or len(frames) >= 25)
