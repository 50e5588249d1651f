"""Never lose a run: exact resume, interrupts, non-finite losses and bad input, run the way a user runs them.

Every run goes through `python vae_training.py ...` in a subprocess. Independent runs start together (two
cores make that roughly twice as fast) and torchvision's download URL points at a closed local port, so a
test that reaches the download path fails at once instead of touching the network.
"""

import json
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from conftest import ONE_THREAD as ENV
from conftest import REPO, TINY, closed_port, make_flowers_root
from conftest import error_line as one_error_line

pytestmark = pytest.mark.slow
STEPS_PER_EPOCH = 4  # 32 training images, batch 8


# Runs the real script, with only torchvision's download URL moved to a port where nothing listens.
WRAPPER = ("import runpy, sys; from torchvision.datasets import Flowers102; "
           "Flowers102._download_url_prefix = sys.argv.pop(1); "
           "sys.argv[0] = 'vae_training.py'; runpy.run_path('vae_training.py', run_name='__main__')")


def command(args):
    return [sys.executable, "-c", WRAPPER, f"http://127.0.0.1:{closed_port()}/", *map(str, args)]


def start(args):
    return subprocess.Popen(command(args), cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(process, timeout=180):
    stdout, stderr = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run_together(*arg_lists):
    """Run several training commands at once; their CompletedProcesses in the same order."""
    return [finish(process) for process in [start(args) for args in arg_lists]]


def run(*args):
    return run_together(args)[0]


def succeeded(result):
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr[-3000:]}"
    return result


def error_line(result):
    """The one-line error of a failed run."""
    assert result.returncode != 0, result.stdout
    return one_error_line(result.stderr)


def parameters(path):
    return torch.load(path, weights_only=True)["model"]


def assert_same_parameters(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


def loss_steps(run_dir):
    """Steps of the per-step `loss` scalars in every event file of the run (all sessions, nothing purged)."""
    steps = []
    for events_file in sorted((run_dir / "loss_Total Loss").glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(events_file)).Load():
            if any(value.tag == "loss" for value in event.summary.value):
                steps.append(event.step)
    return steps


# ------------------------------------------------------------------------------------- exact resume

@pytest.fixture(scope="module")
def resumed_runs(flowers_root, tmp_path_factory):
    """An uninterrupted 4-epoch run, the same run stopped after 2 epochs and resumed, stopped mid-epoch by
    --max-steps and resumed, and a second 2-epoch run with the same seed."""
    log_dir = tmp_path_factory.mktemp("resume")
    # A KL warm-up makes the schedule position part of what must survive the interruption.
    common = ["--data-dir", flowers_root, "--log-dir", log_dir, "--seed", "7", "--kl-schedule", "linear",
              "--kl-warmup-epochs", "3", *TINY]
    first = run_together([*common, "--epochs", "4", "--run-name", "straight"],
                         [*common, "--epochs", "2", "--run-name", "halves"],
                         [*common, "--epochs", "4", "--max-steps", "6", "--run-name", "mid-epoch"],
                         [*common, "--epochs", "2", "--run-name", "halves-again"])
    for result in first:
        succeeded(result)
    shutil.copy(log_dir / "halves" / "checkpoint.pt", log_dir / "halves-epoch2.pt")
    second = run_together(
        ["--resume", "auto", "--log-dir", log_dir, "--run-name", "halves", "--epochs", "4"],
        ["--resume", log_dir / "mid-epoch" / "checkpoint.pt", "--epochs", "4", "--max-steps", "0"])
    for result in second:
        succeeded(result)
    return log_dir, first, second


def test_resumed_runs_end_bit_for_bit_where_the_uninterrupted_run_ends(resumed_runs):
    log_dir, _, (halves, mid_epoch) = resumed_runs
    assert "resuming" in halves.stdout and "epoch 3, step 8" in halves.stdout
    assert "epoch 2, step 6" in mid_epoch.stdout
    straight = torch.load(log_dir / "straight" / "checkpoint.pt", weights_only=True)
    for name in ("halves", "mid-epoch"):
        resumed = torch.load(log_dir / name / "checkpoint.pt", weights_only=True)
        assert (resumed["epoch"], resumed["step"]) == (4, 4 * STEPS_PER_EPOCH)
        assert_same_parameters(resumed["model"], straight["model"])
        assert resumed["schedule"] == straight["schedule"]
        for a, b in zip(resumed["optimizer"]["state"].values(), straight["optimizer"]["state"].values()):
            assert all(torch.equal(a[key], b[key]) for key in a)


def test_the_same_seed_gives_identical_parameters(resumed_runs):
    log_dir, _, _ = resumed_runs
    assert_same_parameters(parameters(log_dir / "halves-epoch2.pt"),
                           parameters(log_dir / "halves-again" / "checkpoint.pt"))
    assert not torch.equal(parameters(log_dir / "halves-epoch2.pt")["encoder.mean.weight"],
                           parameters(log_dir / "straight" / "checkpoint.pt")["encoder.mean.weight"])


def test_resumed_tensorboard_run_has_every_step_once(resumed_runs):
    log_dir, _, _ = resumed_runs
    for name in ("straight", "halves", "mid-epoch"):
        assert loss_steps(log_dir / name) == list(range(1, 4 * STEPS_PER_EPOCH + 1)), name


def test_checkpoints_hold_the_whole_state_and_load_weights_only(resumed_runs):
    log_dir, _, _ = resumed_runs
    for name in ("checkpoint.pt", "best.pt"):
        checkpoint = torch.load(log_dir / "straight" / name, weights_only=True)
        assert {"format_version", "model", "optimizer", "schedule", "rng", "epoch", "step", "config", "versions",
                "git_sha"} <= checkpoint.keys()
        assert checkpoint["rng"].keys() == {"torch"}  # the CPU generator: nothing draws from Python's or numpy's
        assert checkpoint["config"]["latent_size"] == 10 and checkpoint["config"]["seed"] == 7
        assert checkpoint["versions"]["torch"] == torch.__version__
    assert not list((log_dir / "straight").glob(".*.tmp*")), "a temporary checkpoint file was left behind"


def test_every_run_folder_has_a_manifest(resumed_runs):
    log_dir, _, _ = resumed_runs
    manifest = json.loads((log_dir / "straight" / "run.json").read_text())
    assert {"config", "versions", "git_sha", "command", "started"} <= manifest.keys()
    assert manifest["config"]["seed"] == 7 and manifest["config"]["epochs"] == 4
    assert "--run-name" in manifest["command"] and "straight" in manifest["command"]
    assert manifest["versions"]["torch"] == torch.__version__
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert manifest["git_sha"] == (head or None)
    # A resumed run keeps the original manifest and records the resumption beside it.
    assert json.loads((log_dir / "halves" / "run.json").read_text())["config"]["epochs"] == 2
    resumed = [json.loads(p.read_text()) for p in (log_dir / "halves").glob("run-resumed-*.json")]
    assert len(resumed) == 1 and resumed[0]["config"]["epochs"] == 4
    assert resumed[0]["resumed_from"] == str(log_dir / "halves" / "checkpoint.pt")


# ------------------------------------------------------------------------------------ interrupts


def test_sigint_and_sigterm_finish_the_step_save_and_say_how_to_resume(flowers_root, tmp_path):
    codes = {"sigint": (signal.SIGINT, 130), "sigterm": (signal.SIGTERM, 143)}
    processes = {name: start(["--data-dir", flowers_root, "--log-dir", tmp_path, "--run-name", name,
                              "--epochs", "100000", *TINY]) for name in codes}
    # Wait until training is under way (the first epoch's checkpoint exists), then signal.
    deadline = time.monotonic() + 120
    for name, process in processes.items():
        while not (tmp_path / name / "checkpoint.pt").exists():
            assert process.poll() is None and time.monotonic() < deadline, finish(process).stderr
            time.sleep(0.1)
        process.send_signal(codes[name][0])
    for name, process in processes.items():
        result = finish(process, timeout=60)
        checkpoint_path = tmp_path / name / "checkpoint.pt"
        assert result.returncode == codes[name][1], result.stderr
        last_line = result.stderr.replace("\r", "\n").strip().splitlines()[-1]
        assert "checkpoint saved" in last_line and f"--resume {checkpoint_path}" in last_line, last_line
        assert torch.load(checkpoint_path, weights_only=True)["step"] >= STEPS_PER_EPOCH

    checkpoint_path = tmp_path / "sigterm" / "checkpoint.pt"
    stopped = torch.load(checkpoint_path, weights_only=True)
    epochs = stopped["epoch"] + 1  # finish the epoch the signal stopped
    resumed = succeeded(run("--resume", checkpoint_path, "--epochs", epochs))
    assert f"epoch {stopped['epoch'] + 1}, step {stopped['step']}" in resumed.stdout
    assert torch.load(checkpoint_path, weights_only=True)["step"] == epochs * STEPS_PER_EPOCH
    assert loss_steps(tmp_path / "sigterm") == list(range(1, epochs * STEPS_PER_EPOCH + 1))


# ----------------------------------------------------------------------------------- the CLI's errors

def test_errors_are_one_line_with_exit_code_2_and_debug_shows_the_traceback(tmp_path):
    plain, debug = run_together(["--resolution", "12", "--log-dir", tmp_path],
                                ["--resolution", "12", "--log-dir", tmp_path, "--debug"])
    assert plain.returncode == 2
    assert error_line(plain) == "error: --resolution must be a positive multiple of 8, got 12"
    assert plain.stderr.strip() == error_line(plain)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "UserError" in debug.stderr


# The remaining error cases call the CLI's main() in this process: the same argument parsing, checks and
# one-line error printing as `python vae_training.py`, without paying a Python start-up per case.

@pytest.fixture
def cli(monkeypatch, capsys):
    """main(argv) -> (exit code, stdout, the one `error:` line or None), with the download URL closed."""
    from torchvision.datasets import Flowers102

    import vae_training

    monkeypatch.setattr(Flowers102, "_download_url_prefix", f"http://127.0.0.1:{closed_port()}/")
    monkeypatch.setattr(sys, "argv", ["vae_training.py"])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    def call(*args):
        capsys.readouterr()
        code = vae_training.main([str(arg) for arg in args])
        out, err = capsys.readouterr()
        # A progress bar may still be on the line the error is printed on.
        errors = [line[line.index("error: "):] for line in err.replace("\r", "\n").splitlines() if "error: " in line]
        assert len(errors) <= 1, err
        assert code == 2 if errors else code == 0, (code, out, err)
        return code, out + err, errors[0] if errors else None

    return call


def test_impossible_arguments_name_the_flag(cli, flowers_root, tmp_path):
    common = ["--data-dir", flowers_root, "--log-dir", tmp_path, *TINY, "--epochs", "1"]
    for flag, value in [("--resolution", "20"), ("--latent-size", "0"), ("--beta", "-0.5"), ("--batch-size", "64"),
                        ("--lr", "0")]:
        code, _, line = cli(*common, flag, value)
        assert code == 2 and flag in line, line
    _, _, line = cli(*common, "--batch-size", "64")
    assert "larger than the 32 training images" in line and "--batch-size 32" in line


def test_an_unwritable_log_dir_is_reported_before_training(cli, flowers_root, tmp_path):
    regular_file = tmp_path / "a-file"
    regular_file.write_text("")
    code, output, line = cli("--data-dir", flowers_root, "--log-dir", regular_file / "runs", "--epochs", "1", *TINY)
    assert code == 2 and str(regular_file / "runs") in line and "--log-dir" in line
    assert "training on" not in output


def test_a_huge_learning_rate_stops_with_the_step(cli, flowers_root, tmp_path):
    code, output, line = cli("--data-dir", flowers_root, "--log-dir", tmp_path, "--run-name", "huge-lr",
                             "--lr", "1e6", "--epochs", "50", *TINY)
    assert code == 2 and "at step" in line and "--lr" in line, line
    if not (tmp_path / "huge-lr" / "checkpoint.pt").exists():
        assert "no checkpoint" in line, line


def test_a_non_finite_loss_keeps_the_last_good_checkpoint(cli, resumed_runs, tmp_path):
    log_dir, _, _ = resumed_runs
    run_dir = tmp_path / "diverging"
    run_dir.mkdir()
    # A good run's checkpoint whose optimizer now has a learning rate of 1e6: resumed, it blows up within steps.
    checkpoint = torch.load(log_dir / "halves-epoch2.pt", weights_only=True)
    for group in checkpoint["optimizer"]["param_groups"]:
        group["lr"] = 1e6
    torch.save(checkpoint, run_dir / "checkpoint.pt")
    good = (run_dir / "checkpoint.pt").read_bytes()
    code, _, line = cli("--resume", run_dir / "checkpoint.pt", "--epochs", "50", "--data-dir",
                        checkpoint["config"]["data_dir"])
    assert code == 2 and "step" in line and str(run_dir / "checkpoint.pt") in line and "--lr" in line, line
    assert (run_dir / "checkpoint.pt").read_bytes() == good


class RunsCode:
    """Unpickling this creates a file: the proof that a payload ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_foreign_and_malicious_checkpoints_are_refused(cli, resumed_runs, tmp_path):
    log_dir, _, _ = resumed_runs
    marker = tmp_path / "payload-ran"
    checkpoint = torch.load(log_dir / "halves-epoch2.pt", weights_only=True)
    cases = {
        "with-object": {**checkpoint, "extra": RunsCode(marker)},
        # Still loadable with weights_only: the payload hides in a string a careless loader would unpickle.
        "with-hex-pickle": {**checkpoint, "rng": {**checkpoint["rng"], "python": pickle.dumps(RunsCode(marker)).hex()}},
        "not-ours": {"state_dict": {"weight": torch.zeros(3)}, "epoch": 3},
    }
    for name, contents in cases.items():
        torch.save(contents, tmp_path / f"{name}.pt")
    (tmp_path / "notes.pt").write_text("not a checkpoint\n")
    lines = {}
    for name in ["with-object", "not-ours", "notes"]:
        code, _, lines[name] = cli("--resume", tmp_path / f"{name}.pt", "--log-dir", tmp_path / "resumed",
                                   "--run-name", name)
        assert code == 2 and str(tmp_path / f"{name}.pt") in lines[name], lines[name]
    # Older checkpoints stored Python's RNG state; nothing reads it now, so a payload hidden there never runs.
    code, _, _ = cli("--resume", tmp_path / "with-hex-pickle.pt", "--log-dir", tmp_path / "resumed", "--run-name",
                     "with-hex-pickle", "--epochs", "3")
    assert code == 0
    assert not marker.exists(), "a checkpoint's pickled payload ran"
    assert "refusing" in lines["with-object"] and "could run code" in lines["with-object"]
    assert "not a checkpoint of this project" in lines["not-ours"]
    assert "not a PyTorch checkpoint" in lines["notes"]
    # PyTorch's own refusal suggests weights_only=False, the one thing never to do with a stranger's file.
    assert not any("weights_only" in line for line in lines.values()), lines


def test_resume_with_another_configuration_names_the_flag(cli, resumed_runs):
    log_dir, _, _ = resumed_runs
    checkpoint = log_dir / "straight" / "checkpoint.pt"
    code, _, line = cli("--resume", checkpoint, "--latent-size", "12")
    assert code == 2 and "--latent-size" in line and str(checkpoint) in line


@pytest.fixture
def bad_data(tmp_path):
    """Flowers102 roots, each broken in one way, built from the same real JPEGs."""
    roots = {}
    for name in ("corrupt", "truncated", "no-setid", "garbage-setid", "wrong-setid"):
        roots[name] = make_flowers_root(tmp_path / name, train=16, val=0, test=8)

    def jpg(name, i):
        return roots[name] / "flowers-102" / "jpg" / f"image_{i:05d}.jpg"

    jpg("corrupt", 3).write_bytes(b"this is not a JPEG")
    data = jpg("truncated", 5).read_bytes()
    jpg("truncated", 5).write_bytes(data[:len(data) // 3])
    (roots["no-setid"] / "flowers-102" / "setid.mat").unlink()
    (roots["garbage-setid"] / "flowers-102" / "setid.mat").write_bytes(b"\x00garbage" * 20)
    from scipy.io import savemat

    savemat(roots["wrong-setid"] / "flowers-102" / "setid.mat", {"labels": [1, 2, 3]})
    roots["empty"] = tmp_path / "empty"
    roots["empty"].mkdir()
    roots["missing"] = tmp_path / "does-not-exist"
    return roots, jpg


def test_bad_data_is_named_with_the_fix(cli, bad_data, tmp_path):
    roots, jpg = bad_data
    lines = {}
    for name, root in roots.items():
        code, output, lines[name] = cli("--data-dir", root, "--log-dir", tmp_path / "runs", "--epochs", "1", *TINY)
        assert code == 2, (name, output)
    for name, broken in (("corrupt", jpg("corrupt", 3)), ("truncated", jpg("truncated", 5))):
        assert str(broken) in lines[name] and "Replace or delete" in lines[name], lines[name]
    for name in ("garbage-setid", "wrong-setid"):
        assert str(roots[name] / "flowers-102" / "setid.mat") in lines[name], lines[name]
        assert "official setid.mat" in lines[name], lines[name]
    for name in ("no-setid", "empty"):
        line = lines[name]
        assert str(roots[name] / "flowers-102") in line and "could not be downloaded" in line, line
        assert "102flowers.tgz" in line and "setid.mat" in line and "--data-dir" in line, line
    assert "no setid.mat" in lines["no-setid"]
    # A folder that does not exist is a typo far more often than a wish to download: it is named, not created.
    assert f"the data folder {roots['missing']} does not exist" in lines["missing"], lines["missing"]
    assert not roots["missing"].exists()

    code, output, _ = cli("--data-dir", roots["corrupt"], "--log-dir", tmp_path / "runs", "--epochs", "1",
                          "--skip-bad-images", *TINY)
    assert "skipped 1 unreadable image" in output and "training on 15 images" in output


def test_a_failed_checkpoint_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    from vae import checkpoint as checkpoints

    path = tmp_path / "checkpoint.pt"
    checkpoints.save_checkpoint(path, model={"w": torch.ones(3)}, config={}, step=1)
    before = path.read_bytes()

    def killed_mid_write(descriptor):
        raise KeyboardInterrupt  # what a Ctrl-C (or the process dying) does with the new bytes half on the disk

    monkeypatch.setattr(checkpoints.os, "fsync", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_checkpoint(path, model={"w": torch.zeros(3)}, config={}, step=2)
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]
    monkeypatch.undo()
    with pytest.raises(Exception, match="non-finite"):
        checkpoints.save_checkpoint(path, model={"w": torch.tensor([1.0, float("nan")])}, config={}, step=3)
    assert torch.load(path, weights_only=True)["step"] == 1


def test_resuming_after_a_crash_shows_each_step_once_in_tensorboard(cli, resumed_runs, tmp_path):
    """A crash after step 16 was logged but with the last checkpoint at step 8: the resumed run logs 9-16
    again, and TensorBoard must show them once (the newer ones)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir, _, _ = resumed_runs
    run_dir = tmp_path / "crashed"
    shutil.copytree(log_dir / "halves", run_dir)
    shutil.copy(log_dir / "halves-epoch2.pt", run_dir / "checkpoint.pt")
    code, output, line = cli("--resume", run_dir / "checkpoint.pt", "--epochs", "4")
    assert code == 0, output
    assert sorted(loss_steps(run_dir)) == sorted([*range(1, 17), *range(9, 17)])  # on disk: twice
    for curve in ("KL Loss", "Reconstruction Loss", "Total Loss"):
        events = EventAccumulator(str(run_dir / f"loss_{curve}"), size_guidance={"scalars": 0})
        events.Reload()
        assert [event.step for event in events.Scalars("loss")] == list(range(1, 17)), curve


def test_checkpoint_every_saves_within_an_epoch(cli, flowers_root, tmp_path, monkeypatch):
    import vae_training

    saved = []
    real_save = vae_training.save_checkpoint
    monkeypatch.setattr(vae_training, "save_checkpoint",
                        lambda path, **contents: saved.append((Path(path).name, contents["step"]))
                        or real_save(path, **contents))
    args = ["--data-dir", flowers_root, "--log-dir", tmp_path, "--run-name", "timed", "--epochs", "1", *TINY]
    code, output, _ = cli(*args, "--checkpoint-every", "1e-9")  # the last value wins: due after every step
    assert code == 0, output
    latest = [step for name, step in saved if name == "checkpoint.pt"]
    assert latest[:STEPS_PER_EPOCH - 1] == [1, 2, 3] and latest[-1] == STEPS_PER_EPOCH
    assert ("best.pt", STEPS_PER_EPOCH) in saved


def test_a_failed_image_or_json_write_leaves_the_old_file_whole(checkpoint, flowers_root, tmp_path, monkeypatch,
                                                                capsys):
    """A full disk when the new bytes are flushed (os.fsync fails, as it does with ENOSPC): the grid and the JSON
    it would replace keep their old content, and no temporary file is left beside them."""
    import errno

    import vae.files
    import vae_inference

    grid, report = tmp_path / "keep.png", tmp_path / "keep.json"
    assert vae_inference.main(["sample", "--checkpoint", str(checkpoint), "--num", "4", "--out", str(grid)]) == 0
    report.write_text('{"kept": true}\n')
    old_grid = grid.read_bytes()

    def full_disk(descriptor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(vae.files.os, "fsync", full_disk)
    capsys.readouterr()
    assert vae_inference.main(["sample", "--checkpoint", str(checkpoint), "--num", "9", "--seed", "3", "--out",
                               str(grid)]) == 2
    assert "No space left on device" in one_error_line(capsys.readouterr().err)
    assert vae_inference.main(["evaluate", "--checkpoint", str(checkpoint), "--data-dir", str(flowers_root),
                               "--split", "val", "--iw-samples", "2", "--json", str(report)]) == 2
    assert "No space left on device" in one_error_line(capsys.readouterr().err)
    assert grid.read_bytes() == old_grid and report.read_text() == '{"kept": true}\n'
    assert sorted(path.name for path in tmp_path.iterdir()) == ["keep.json", "keep.png"]


def test_a_file_where_the_projector_goes_leaves_the_run_finished_with_the_command_that_writes_it(
        flowers_root, tmp_path, capsys):
    import shlex

    from conftest import train
    from vae_inference import main as inference_main

    common = ["--data-dir", flowers_root, "--log-dir", tmp_path, "--run-name", "r", *TINY]
    train(*common, "--epochs", 1)
    (tmp_path / "r" / "00008").write_text("a file named like the folder of step 8's projector")
    capsys.readouterr()
    train(*common, "--epochs", 2, "--resume", "auto")  # exits 0: the run is saved and finished
    err = capsys.readouterr().err
    warning = next(line for line in err.splitlines() if line.startswith("warning: the projector"))
    assert "00008" in warning and "Not a directory" in warning and "Traceback" not in err
    assert torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["epoch"] == 2
    command = shlex.split(warning.split("Write it with: ")[1])
    assert command[:3] == ["python", "vae_inference.py", "projector"]
    assert inference_main(command[2:]) == 0
    assert next((tmp_path / "r" / "projector").rglob("metadata.tsv")).read_text().split()


@pytest.mark.parametrize("script", ["vae_training.py", "vae_inference.py", "vae_demo.py"])
def test_ctrl_c_while_the_libraries_load_exits_at_once_with_one_line(script, flowers_root, tmp_path):
    """The interrupt is sent once PyTorch's library is mapped into the process: the middle of the imports, where
    it used to print a traceback from inside them, or be swallowed by one and let the run train on."""
    arguments = {"vae_training.py": ["--data-dir", flowers_root, "--log-dir", tmp_path / "runs", *TINY],
                 "vae_inference.py": ["sample", "--out", tmp_path / "s.png"],
                 "vae_demo.py": ["--port", closed_port()]}[script]
    # As in a terminal, SIGINT acts: started in the background of a non-interactive shell (a CI job), the tests,
    # and every process they start, inherit it ignored, and Python keeps it so. The script runs as __main__ once
    # Python's own handler is back.
    as_in_a_terminal = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                        "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    process = subprocess.Popen([sys.executable, "-c", as_in_a_terminal, script, *map(str, arguments)], cwd=REPO,
                               env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while "libtorch" not in Path(f"/proc/{process.pid}/maps").read_text():
        assert process.poll() is None and time.monotonic() < deadline, "the script ended before it loaded PyTorch"
        time.sleep(0.005)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, (out, err)
    assert err.strip() == "interrupted while loading: nothing was started or written", err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "s.png").exists()
