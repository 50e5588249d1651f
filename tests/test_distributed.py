"""torchrun data parallel on CPU (gloo): the same script, two processes, one run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO
from vae.vae import VAE
from vae_training import main


def torchrun(*args):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "vae_training.py", *map(str, args)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_two_processes_train_one_run_in_sync_and_match_a_single_process(flowers_root, tmp_path):
    common = ["--data-dir", flowers_root, "--batch-size", 16, "--log-dir", tmp_path, "--grid-size", 4,
              "--eval-size", 0, "--device", "cpu", "--num-workers", 1]
    result = torchrun(*common, "--epochs", 2, "--run-name", "ddp")
    assert "parameters identical on all 2 processes" in result.stdout
    assert result.stdout.count("training on 32 images (cpu x 2 processes)") == 1  # only process 0 speaks
    run_dir = tmp_path / "ddp"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]  # before the single-process run below
    distributed = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert distributed["step"] == 4 and distributed["epoch"] == 2  # 32 images / global batch 16, 2 epochs

    assert main([*map(str, common), "--epochs", "2", "--run-name", "single"]) == 0
    single = torch.load(tmp_path / "single" / "checkpoint.pt", weights_only=True)
    # Only process 0 writes events: one file, as a single process writes (HPARAMS included).
    events = [len(list((tmp_path / name).glob("events.out.tfevents.*"))) for name in ("ddp", "single")]
    assert events[0] == events[1] == 1
    # Same global batches and steps; only the reparameterisation noise differs between the two runs.
    assert single["step"] == distributed["step"]
    assert distributed["eval"]["neg_elbo_nats"] == pytest.approx(single["eval"]["neg_elbo_nats"], rel=0.01)

    resumed = torchrun(*common, "--epochs", 3, "--resume", run_dir / "checkpoint.pt")
    assert "resuming" in resumed.stdout and "parameters identical on all 2 processes" in resumed.stdout
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"] == 6


@pytest.mark.slow  # a minute of compilation
def test_compiled_training_saves_an_unwrapped_state_dict(flowers_root, tmp_path):
    code = main(["--data-dir", str(flowers_root), "--compile", "--epochs", "1", "--batch-size", "16", "--device",
                 "cpu", "--log-dir", str(tmp_path), "--run-name", "compiled", "--grid-size", "4", "--eval-size", "0"])
    assert code == 0
    checkpoint = torch.load(tmp_path / "compiled" / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 2 and checkpoint["config"]["compile"] is True
    assert set(checkpoint["model"]) == set(VAE().state_dict())


@pytest.mark.slow
def test_a_diverged_run_ends_with_the_one_line_error_on_every_process(flowers_root, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "vae_training.py", "--data-dir", str(flowers_root), "--batch-size", "16", "--log-dir", str(tmp_path),
               "--run-name", "diverged", "--grid-size", "4", "--eval-size", "0", "--device", "cpu",
               "--num-workers", "1", "--lr", "1e6", "--epochs", "50"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    # Each process's own line (after any progress bar left on the same terminal line), not the report's copies.
    errors = [line[line.index("error: "):] for line in result.stderr.splitlines()
              if "error: the loss became" in line and "traceback :" not in line]
    assert len(errors) == 2, result.stderr[-3000:]  # one per process, the same line
    assert errors[0] == errors[1] and "--lr" in errors[0]
    report = result.stderr[result.stderr.rindex("Root Cause"):]  # torchrun's report ends with process 0's line
    assert "rank      : 0" in report and f"traceback : {errors[0]}" in report, report
    # No traceback from the project's code (torchrun itself reports the failed processes with one).
    assert "vae_training.py\", line" not in result.stderr and "/vae/" not in result.stderr, result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("problem", ["run folder taken", "unreadable image"])
def test_an_error_on_process_0_is_said_by_every_process_and_ends_the_launchers_report(problem, flowers_root,
                                                                                     tmp_path):
    """A refusal that only process 0 meets (the run folder it claims, the image cache it builds) reaches the other
    process too: no gloo traceback from a process left waiting, and torchrun's report ends with the line."""
    import shutil

    data = flowers_root
    if problem == "run folder taken":
        (tmp_path / "runs" / "taken").mkdir(parents=True)
        (tmp_path / "runs" / "taken" / "notes.txt").write_text("mine")
        expected = "already holds a run"
    else:
        data = tmp_path / "photos"
        data.mkdir()
        for path in sorted((flowers_root / "flowers-102" / "jpg").glob("*.jpg"))[:20]:
            shutil.copy(path, data / path.name)
        (data / "broken.jpg").write_bytes(b"\xff\xd8 not a photo")
        expected = "cannot read image"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "vae_training.py", "--data-dir", str(data), "--batch-size", "16", "--log-dir", str(tmp_path / "runs"),
               "--run-name", "taken", "--holdout", "0.2", "--device", "cpu", "--epochs", "1"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    said = [line[line.index("error: "):] for line in result.stderr.splitlines()
            if "error: " in line and expected in line and "traceback :" not in line]
    assert len(said) == 2 and said[0] == said[1], result.stderr[-3000:]  # each process, the same line
    assert "Connection closed" not in result.stderr and "[rank1]" not in result.stderr, result.stderr[-3000:]
    report = result.stderr[result.stderr.rindex("Root Cause"):]  # process 0's failure, the report's last entry
    assert "rank      : 0" in report and f"traceback : {said[0]}" in report, report


def worker_of_rank(launcher, rank):
    """The pid of torchrun's worker process of `rank` (a child of the launcher), or None while it has none."""
    for child in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split():
        environment = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environment:
            return int(child)
    return None


@pytest.mark.slow
def test_a_killed_worker_leaves_the_other_one_line_with_the_resume_that_works(flowers_root, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "vae_training.py", "--data-dir", str(flowers_root), "--batch-size", "16", "--log-dir", str(tmp_path),
               "--run-name", "killed", "--grid-size", "4", "--eval-size", "0", "--device", "cpu", "--num-workers",
               "1", "--epochs", "1000", "--checkpoint-every", "0"]
    launcher = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoint = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.monotonic() + 240
    while not checkpoint.exists():  # the first epoch is saved
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()[1][-3000:]
        time.sleep(0.2)
    time.sleep(1)
    os.kill(worker_of_rank(launcher, 1), signal.SIGKILL)
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    lines = [line[line.index("error: "):] for line in err.replace("\r", "\n").splitlines()
             if line.startswith("error: another process")]
    assert len(lines) == 1, err[-3000:]
    assert "so this one stops too; the last checkpoint" in lines[0] and lines[0].endswith(
        f"python vae_training.py --resume {checkpoint}")
    assert "vae_training.py\", line" not in err and "/vae/" not in err, err[-3000:]  # no traceback of the project
    done = torch.load(checkpoint, weights_only=True)["epoch"]
    assert main(["--resume", str(checkpoint), "--epochs", str(done + 1)]) == 0  # on one process, as printed
    assert torch.load(checkpoint, weights_only=True)["epoch"] == done + 1
