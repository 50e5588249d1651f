"""Resume that means what it says: a best.pt never rewinds its run, --resume auto restarts a run killed before its
first checkpoint, and --epochs on resume extends, refuses or says the run is finished. Through vae_training.main,
in this process."""

import math
import shutil

import pytest
import torch
from PIL import Image, ImageOps

from conftest import TINY, real_flower_files, train
from test_run_folders import failed, snapshot

COSINE = ["--lr-schedule", "cosine", "--lr", "1e-2", "--lr-warmup-epochs", "1"]


@pytest.fixture(scope="module")
def finished_run(flowers_root, tmp_path_factory):
    """A finished 3-epoch cosine run (4 steps per epoch) with a held-out evaluation, so it has a best.pt."""
    log_dir = tmp_path_factory.mktemp("resume")
    train("--data-dir", flowers_root, "--epochs", 3, "--log-dir", log_dir, "--run-name", "done", "--holdout", 0.25,
          *COSINE, *TINY)
    return log_dir / "done"


def test_resuming_best_pt_in_its_own_folder_is_refused_with_the_command_that_continues(finished_run, capsys):
    before = snapshot(finished_run)
    line = failed(capsys, "--resume", finished_run / "best.pt", "--epochs", 5)
    assert "would rewind" in line and f"--resume {finished_run / 'checkpoint.pt'}" in line and "--run-name" in line
    assert snapshot(finished_run) == before


def test_resuming_best_pt_into_a_new_run_branches_off(finished_run, capsys):
    best = torch.load(finished_run / "best.pt", weights_only=True)
    train("--resume", finished_run / "best.pt", "--epochs", best["epoch"] + 1, "--log-dir", finished_run.parent,
          "--run-name", "branch")
    branch = torch.load(finished_run.parent / "branch" / "checkpoint.pt", weights_only=True)
    steps_per_epoch = best["step"] // best["epoch"]
    assert branch["step"] == best["step"] + steps_per_epoch and branch["epoch"] == best["epoch"] + 1


def test_fewer_epochs_than_done_are_refused_with_the_number_done(finished_run, capsys):
    before = snapshot(finished_run)
    line = failed(capsys, "--resume", finished_run / "checkpoint.pt", "--epochs", 2)
    assert "trained 3 epochs already" in line and "--epochs 3 or more" in line
    assert snapshot(finished_run) == before


def test_resuming_a_finished_run_says_so_and_changes_nothing(finished_run, capsys):
    before = snapshot(finished_run)
    capsys.readouterr()
    train("--resume", finished_run / "checkpoint.pt")
    assert "is a finished run: 3 of 3 epochs" in capsys.readouterr().out
    assert snapshot(finished_run) == before


def test_more_epochs_extend_the_cosine_from_the_step_reached_without_warming_up_again(flowers_root, tmp_path):
    common = ["--data-dir", flowers_root, "--log-dir", tmp_path, "--eval-split", "none", *COSINE, *TINY]
    train(*common, "--epochs", 2, "--run-name", "extended")
    checkpoint = tmp_path / "extended" / "checkpoint.pt"
    assert torch.load(checkpoint, weights_only=True)["schedule"]["_last_lr"][0] == pytest.approx(0.0, abs=1e-12)
    train("--resume", checkpoint, "--epochs", 4, "--max-steps", 12)
    # Warm-up (1 epoch of 4 steps) to 1e-2, then a cosine over the rest of the run: resumed with 4 epochs, the rate
    # at step 12 is that of the 4-epoch run's cosine there; a second warm-up would have it at 1e-2 * 5 / 4 steps.
    cosine = 1e-2 * 0.5 * (1 + math.cos(math.pi * (12 - 4) / (16 - 4)))
    assert torch.load(checkpoint, weights_only=True)["schedule"]["_last_lr"][0] == pytest.approx(cosine, rel=1e-6)


def test_resume_auto_restarts_a_run_killed_before_its_first_checkpoint(flowers_root, tmp_path, capsys):
    """A kill -9 in epoch 1 leaves the lock file, run.json and TensorBoard events, but no checkpoint."""
    from vae.config import TrainConfig
    from vae.logs import open_writer
    from vae.run_folder import write_manifest

    run_dir = tmp_path / "k"
    run_dir.mkdir()
    (run_dir / ".lock").touch()
    write_manifest(run_dir, TrainConfig())
    writer = open_writer(run_dir)
    writer.add_scalars("loss", {"KL Loss": 1.0, "Reconstruction Loss": 2.0, "Total Loss": 3.0}, 1)
    writer.close()
    command = ["--resume", "auto", "--run-name", "k", "--data-dir", flowers_root, "--log-dir", tmp_path, "--epochs",
               1, "--eval-split", "none", *TINY]
    capsys.readouterr()
    train(*command)
    out = capsys.readouterr().out
    assert "no checkpoint at" in out and "stopped before its first checkpoint: starting it again" in out
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["epoch"] == 1
    # The same command again: now the run is there, and finished.
    train(*command)
    assert "is a finished run" in capsys.readouterr().out


def test_a_folder_with_another_runs_files_is_not_restarted(flowers_root, tmp_path, capsys):
    run_dir = tmp_path / "other"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    line = failed(capsys, "--resume", "auto", "--run-name", "other", "--data-dir", flowers_root, "--log-dir",
                  tmp_path, "--epochs", 1, "--eval-split", "none", *TINY)
    assert "already holds a run" in line and (run_dir / "notes.txt").read_text() == "mine"


@pytest.mark.slow
@pytest.mark.parametrize("during, signal_name, end_of_run, resume", [
    # SIGTERM (a job scheduler) while the diffusion prior is fitted: a loop of a million steps.
    ("the prior's fit", "SIGTERM", ["--eval-split", "none", "--diffusion-prior-steps", "1000000"],
     ["--diffusion-prior-steps", "5"]),
    # Ctrl-C while FID is measured: the GMM is fitted in a moment, then a hundred thousand samples to score.
    ("FID", "SIGINT", ["--holdout", "0.25", "--diffusion-prior-steps", "0", "--fid-samples", "100000"],
     ["--fid-samples", "0"]),
])
def test_a_signal_at_the_end_of_a_run_stops_it_and_a_resume_finishes_it(during, signal_name, end_of_run, resume,
                                                                       flowers_root, tmp_path):
    import signal
    import subprocess
    import sys
    import threading
    import time

    from conftest import ONE_THREAD, REPO, collect

    command = [sys.executable, "vae_training.py", "--data-dir", str(flowers_root), "--log-dir", str(tmp_path),
               "--run-name", "end", "--epochs", "1", *end_of_run, *map(str, TINY)]
    process = subprocess.Popen(command, cwd=REPO, env=ONE_THREAD, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = bytearray()  # as it comes: the signal waits for the progress bar of the step it is meant to stop
    reader = threading.Thread(target=collect, args=(process.stderr, stderr), daemon=True)
    reader.start()
    # Its progress bar (the kind sampler, the best one, is fitted first), however long the end of the run takes
    # to reach it on a busy machine.
    marker = {"the prior's fit": "kind prior", "FID": "inception features"}[during]
    deadline = time.monotonic() + 300
    while marker.encode() not in stderr and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marker.encode() in stderr, bytes(stderr[-2000:])
    sent = time.monotonic()
    process.send_signal(getattr(signal, signal_name))
    process.wait(timeout=60)
    reader.join(timeout=30)
    err = bytes(stderr).decode(errors="replace")
    checkpoint = tmp_path / "end" / "checkpoint.pt"
    assert process.returncode == 128 + getattr(signal, signal_name), err[-2000:]
    assert time.monotonic() - sent < 30, during  # promptly, not after the whole step
    assert "stopped at the end of the run" in err and "--resume" in err and "Traceback" not in err, err[-2000:]
    assert not torch.load(checkpoint, weights_only=True).get("samplers")
    train("--resume", checkpoint, *resume)
    kinds = {"gmm", "diffusion", "kind"} if "--diffusion-prior-steps" in resume[:1] else {"gmm"}
    assert set(torch.load(checkpoint, weights_only=True)["samplers"]) == kinds


def test_a_resume_on_moved_data_goes_on_and_on_other_images_is_refused(tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for path in real_flower_files(20):
        shutil.copy(path, photos / path.name)
    common = ["--log-dir", tmp_path / "runs", "--holdout", 0.2, *TINY]
    train("--data-dir", photos, "--run-name", "r", "--epochs", 1, *common)
    checkpoint = tmp_path / "runs" / "r" / "checkpoint.pt"
    assert torch.load(checkpoint, weights_only=True)["data"]["train"]["images"] == 16

    moved = tmp_path / "moved"
    shutil.move(photos, moved)  # the same photos in another folder: the run goes on
    train("--resume", checkpoint, "--data-dir", moved, "--epochs", 2)
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 2

    before = snapshot(checkpoint.parent)
    extra = next(moved.glob("*.jpg"))
    shutil.copy(extra, moved / f"copy-{extra.name}")  # one more photo: other training or held-out images
    line = failed(capsys, "--resume", checkpoint, "--data-dir", moved, "--epochs", 3)
    assert "gives other" in line and "images than" in line and "moved is fine" in line, line
    (moved / f"copy-{extra.name}").unlink()
    with Image.open(extra) as photo:  # the same number of photos, one of them edited (mirrored)
        mirrored = ImageOps.mirror(photo.convert("RGB"))
    mirrored.save(extra, "JPEG")
    assert "gives other" in failed(capsys, "--resume", checkpoint, "--data-dir", moved, "--epochs", 3)
    assert snapshot(checkpoint.parent) == before
