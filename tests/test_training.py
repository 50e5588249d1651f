"""The training core in vae/training.py, run in this process: the schedule inside the loss, free bits, one
evaluation for training and inference, and exact resume of a run with two parameter groups."""

import json

import pytest
import torch

from conftest import TINY, load_events, train
from datasets.batches import ImageBatches
from vae.losses import ELBOLoss, kl_per_dimension
from vae.metrics import active_units
from vae.config import TrainConfig
from vae.evaluation import evaluate
from vae.training import Optimization, TrainState, train_one_epoch
from vae.vae import VAE
from vae_inference import main as inference_main


def test_the_kl_schedule_weight_enters_the_loss_at_a_known_step():
    torch.manual_seed(0)
    model = VAE((8, 8), latent_size=3, channels=[4])
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    batches = ImageBatches(images, batch_size=4, device="cpu", shuffle=False)
    loss_fn = ELBOLoss(beta=123.0)  # the schedule must replace this weight
    config = TrainConfig(kl_schedule="linear", beta=1.0, kl_warmup_epochs=8)  # one step per epoch: 8 steps
    optimization = Optimization(model, config, steps_per_epoch=1)
    state = TrainState(step=2)  # the step's weight is 2 / 8
    losses = train_one_epoch(model, batches, loss_fn, optimization, state, progress=False)
    assert loss_fn.beta == pytest.approx(0.25) and state.step == 3 and state.batch == 1
    total, kl, reconstruction = losses["Total Loss"], losses["KL Loss"], losses["Reconstruction Loss"]
    assert kl > 0 and total == pytest.approx(0.25 * kl + reconstruction, rel=1e-5)


def test_free_bits_through_the_cli_floor_each_dimension_in_the_logged_total(flowers_root, tmp_path):
    floor = 2.0  # nats per dimension: far above what a fresh model's KL reaches in two steps
    train("--data-dir", flowers_root, "--epochs", 1, "--max-steps", 2, "--free-bits", floor, "--beta", 0.5,
          "--log-dir", tmp_path, "--run-name", "fb", "--eval-split", "none", *TINY)
    curves = {name: [e.value for e in load_events(tmp_path / "fb" / f"loss_{name}").Scalars("loss")]
              for name in ("KL Loss", "Reconstruction Loss", "Total Loss")}
    for kl, reconstruction, total in zip(curves["KL Loss"], curves["Reconstruction Loss"], curves["Total Loss"]):
        assert kl < 10 * floor  # the raw KL is what is logged, below the floor's total of 10 dims x 2 nats
        assert total == pytest.approx(reconstruction + 0.5 * 10 * floor, rel=1e-5)


def test_training_evaluation_equals_vae_inference_evaluate(flowers_root, tmp_path):
    train("--data-dir", flowers_root, "--holdout", 0.25, "--epochs", 2, "--lr", 1e-2, "--log-dir", tmp_path,
          "--run-name", "e", *TINY)
    checkpoint = torch.load(tmp_path / "e" / "checkpoint.pt", weights_only=True)
    out = tmp_path / "eval.json"
    # Training evaluates every epoch with K = 1, its --seed and batches of 256: the same here.
    assert inference_main(["evaluate", "--checkpoint", str(tmp_path / "e" / "checkpoint.pt"), "--data-dir",
                           str(flowers_root), "--holdout-from-checkpoint", "--iw-samples", "1", "--batch-size",
                           "256", "--seed", "0", "--json", str(out)]) == 0
    logged, evaluated = checkpoint["eval"], json.loads(out.read_text())
    assert logged["num_images"] == evaluated["num_images"] == 8
    shared = set(logged) & set(evaluated)
    assert {"neg_elbo_nats", "kl_nats", "iwae_nll_nats", "bits_per_dim", "psnr_db", "active_units"} <= shared
    for key in sorted(shared):
        assert evaluated[key] == (pytest.approx(logged[key], rel=1e-9) if isinstance(logged[key], (float, list))
                                  else logged[key]), key
    scalars = load_events(tmp_path / "e").Scalars("eval/neg_elbo_nats")
    assert scalars[-1].value == pytest.approx(logged["neg_elbo_nats"], rel=1e-6)


def test_evaluate_matches_per_image_numbers_computed_directly():
    torch.manual_seed(0)
    model = VAE((8, 8), latent_size=3, channels=[4], sigma=0.3).eval()
    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    metrics = evaluate(model, ImageBatches(images, 4, "cpu", shuffle=False), beta=0.5, iw_samples=1,
                       generator=torch.Generator().manual_seed(3))
    x = images.float() / 255
    with torch.no_grad():
        mean, log_var = model.encode(x)
        kl = kl_per_dimension(mean, log_var).sum(dim=1)
        mse = (model.decode(mean) - x).pow(2).mean()
    assert metrics["kl_nats"] == pytest.approx(kl.mean().item(), rel=1e-5)
    assert metrics["psnr_db"] == pytest.approx(10 * torch.log10(1 / mse).item(), rel=1e-5)
    assert metrics["posterior_std"] == pytest.approx(log_var.mul(0.5).exp().mean().item(), rel=1e-5)
    # Summed moments across batches (as under torchrun) give the variance torch.var gives on all the means.
    torch.testing.assert_close(torch.tensor(metrics["posterior_mean_variance"], dtype=torch.float64),
                               mean.flatten(1).double().var(dim=0),
                               rtol=1e-5, atol=1e-8)
    assert metrics["active_units"] == active_units(mean.flatten(1).var(dim=0))


def test_a_learned_sigma_run_resumes_bit_for_bit_with_both_parameter_groups(flowers_root, tmp_path):
    common = ["--data-dir", flowers_root, "--log-dir", tmp_path, "--likelihood", "gaussian-learned", "--lr", 1e-3,
              "--sigma-lr", 0.05, "--eval-split", "none", *TINY]
    train(*common, "--epochs", 2, "--run-name", "straight")
    train(*common, "--epochs", 1, "--run-name", "halves")
    train("--resume", tmp_path / "halves" / "checkpoint.pt", "--epochs", 2)
    straight = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    resumed = torch.load(tmp_path / "halves" / "checkpoint.pt", weights_only=True)
    assert [group["lr"] for group in resumed["optimizer"]["param_groups"]] == [1e-3, 0.05]
    assert resumed["step"] == straight["step"] == 8
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    assert straight["model"]["likelihood.raw_log_sigma"] != VAE(likelihood="gaussian-learned").likelihood.raw_log_sigma


@pytest.mark.parametrize("native", [True, False])
def test_amp_trains_under_bf16_autocast_on_the_cpu_and_keeps_float32_weights(native, flowers_root, tmp_path,
                                                                            monkeypatch, capsys):
    """With native bf16, --amp autocasts every step; without it (emulated, far slower) the run stays in float32."""
    import vae.training

    monkeypatch.setattr(vae.training, "native_bf16", lambda: native)
    autocast_dtypes = []
    original = torch.autocast.__init__

    def recording(self, device_type, dtype=None, enabled=True, cache_enabled=None):
        if enabled:
            autocast_dtypes.append((device_type, dtype))
        original(self, device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)
    monkeypatch.setattr(torch.autocast, "__init__", recording)
    train("--data-dir", flowers_root, "--amp", "--epochs", 1, "--log-dir", tmp_path, "--run-name", "amp",
          "--eval-split", "none", *TINY)  # TINY's --threads 1: no timing of thread counts, only the steps
    assert autocast_dtypes == ([("cpu", torch.bfloat16)] * 4 if native else [])  # one autocast region per step
    assert ("--amp is off for this run" in capsys.readouterr().out) != native
    checkpoint = torch.load(tmp_path / "amp" / "checkpoint.pt", weights_only=True)
    assert all(t.dtype == torch.float32 for t in checkpoint["model"].values())


def test_a_finished_run_fills_hparams_settings_and_the_projector(flowers_root, tmp_path):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    train("--data-dir", flowers_root, "--holdout", 0.25, "--epochs", 1, "--log-dir", tmp_path, "--run-name", "hp",
          *TINY)
    run_dir = tmp_path / "hp"
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    hparams, metrics = {}, {}
    for events in run_dir.rglob("events.out.tfevents.*"):
        for event in EventFileLoader(str(events)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "hparams":
                    data = HParamsPluginData.FromString(value.metadata.plugin_data.content)
                    hparams.update({k: v for k, v in data.session_start_info.hparams.items()})
                elif value.tag.startswith("hparams/"):
                    metrics[value.tag] = value.simple_value if value.HasField("simple_value") else \
                        torch.tensor(list(value.tensor.float_val)).item()
    assert hparams["lr"].number_value == pytest.approx(1e-4) and hparams["likelihood"].string_value == "gaussian"
    assert hparams["latent_shape"].string_value == "null"
    assert metrics["hparams/psnr_db"] == pytest.approx(checkpoint["eval"]["psnr_db"], rel=1e-5)
    assert metrics["hparams/bits_per_dim"] == pytest.approx(checkpoint["eval"]["bits_per_dim"], rel=1e-5)
    assert "settings/text_summary" in load_events(run_dir).Tags()["tensors"]

    config = (run_dir / "projector_config.pbtxt").read_text()
    assert "metadata_path" in config and "sprite" in config
    folder = next(path.parent for path in run_dir.rglob("tensors.tsv"))
    means = [line.split("\t") for line in (folder / "tensors.tsv").read_text().splitlines()]
    assert len(means) == 8 and len(means[0]) == 10  # the 8 held-out images, 10 latent dimensions
    from datasets.batches import holdout_split
    held_out = holdout_split(32, 0.25, 0)[1].tolist()
    classes = (folder / "metadata.tsv").read_text().split()
    assert classes == [str((i + 1) % 102 + 1) for i in held_out]  # conftest's roots label image k as k % 102 + 1


def test_timing_the_thread_counts_leaves_the_model_and_the_random_stream_as_they_were():
    from vae.threads import choose_threads, describe
    from vae.training import training_step_probe

    torch.manual_seed(0)
    model = VAE(batch_norm=True)  # BatchNorm: a training-mode forward pass would move its running statistics
    x = torch.rand(8, 3, 32, 32)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    rng = torch.get_rng_state()
    threads = torch.get_num_threads()
    try:
        count, timings = choose_threads(training_step_probe(model, x, TrainConfig()), repeats=1, counts=(1, 2))
        assert set(timings) == {1, 2} and count in (1, 2) and torch.get_num_threads() == count
        assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
        assert torch.equal(torch.get_rng_state(), rng) and all(p.grad is None for p in model.parameters())
        assert describe(count, timings, unit_count=8).startswith(f"threads: {count} (timed: 1 -> ")
        assert choose_threads(lambda: None, requested=1) == (1, {}) and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_training_says_how_many_threads_it_uses(flowers_root, tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        train("--data-dir", flowers_root, "--epochs", 1, "--max-steps", 1, "--log-dir", tmp_path, "--run-name", "t",
              "--eval-split", "none", "--threads", 1, *TINY)
        assert "threads: 1 (--threads)" in capsys.readouterr().out
        train("--data-dir", flowers_root, "--epochs", 1, "--max-steps", 1, "--log-dir", tmp_path, "--run-name", "u",
              "--eval-split", "none", *TINY, "--threads", 0)  # the last --threads counts: 0, chosen by timing
        out = capsys.readouterr().out
        assert "threads: " in out and "(timed: 1 -> " in out and "images/s" in out
    finally:
        torch.set_num_threads(threads)


def test_num_workers_0_decodes_in_this_process(flowers_root, tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    import datasets.decoding as decoding

    files = []
    for i in range(130):  # enough images that 2 workers would start a pool
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((40, 40, 3), i, dtype=np.uint8)).save(files[-1])
    monkeypatch.setattr(decoding, "_pool_context", lambda: pytest.fail("a decoding pool was started"))
    images, kept = decoding.decode_images(files, 32, num_workers=0)
    assert images.shape == (130, 3, 32, 32) and len(kept) == 130 and images[7].float().mean() == 7
    args = [a if a != "1" or i == 0 or TINY[i - 1] != "--num-workers" else "0" for i, a in enumerate(TINY)]
    train("--data-dir", flowers_root, "--epochs", 1, "--max-steps", 1, "--log-dir", tmp_path, "--run-name", "w0",
          "--eval-split", "none", *args)
    assert torch.load(tmp_path / "w0" / "checkpoint.pt", weights_only=True)["config"]["num_workers"] == 0


def test_what_changes_is_a_curve_and_what_does_not_is_left_to_the_settings(flowers_root, tmp_path):
    train("--data-dir", flowers_root, "--epochs", 2, "--log-dir", tmp_path, "--run-name", "moving", "--eval-split",
          "none", "--kl-schedule", "linear", "--lr-schedule", "cosine", "--likelihood", "gaussian-learned", *TINY)
    tags = set(load_events(tmp_path / "moving").Tags()["scalars"])
    assert {"train/kl_weight", "train/lr", "train/decoder_sigma"} <= tags
