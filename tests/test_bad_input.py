"""Bad input, round three: each gets one line that names the problem and the fix, before any training where it can
be known then. Through the CLIs, in this process."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.io import loadmat, savemat

from conftest import TINY, error_line, load_events, make_flowers_root, train
from vae_training import main as training_main


def fails(capsys, main, *args):
    capsys.readouterr()
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 2, err
    return error_line(err)


def test_a_diverging_bernoulli_run_ends_with_the_one_line_error(flowers_root, tmp_path, capsys):
    line = fails(capsys, training_main, "--data-dir", flowers_root, "--log-dir", tmp_path, "--likelihood", "bernoulli",
                 "--lr", 10, "--epochs", 30, "--eval-split", "none", *TINY)
    assert "the loss became nan" in line and "--lr" in line, line


def test_a_step_into_non_finite_weights_stops_the_run_before_anything_is_logged(flowers_root, tmp_path, capsys,
                                                                               monkeypatch):
    """A step can make a weight NaN although the loss before it was finite (a NaN gradient): the run must stop at
    the end of that epoch, before it evaluates or logs grids of NaN images, and keep its last good checkpoint."""
    import vae.training

    real_step = vae.training.Optimization.step

    def step_into_nan(self, model, total):
        grad_norm = real_step(self, model, total)
        if self.lr_schedule.last_epoch == 3:  # the third step of the run, in its second epoch
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = float("nan")
        return grad_norm

    monkeypatch.setattr(vae.training.Optimization, "step", step_into_nan)
    line = fails(capsys, training_main, "--data-dir", flowers_root, "--log-dir", tmp_path, "--run-name", "r",
                 "--epochs", 3, "--max-steps", 3, "--batch-size", 16, *TINY[2:])
    assert "became non-finite by step 3" in line and "checkpoint.pt keeps the last good state" in line, line
    events = load_events(tmp_path / "r")
    assert [event.step for event in events.Images("reconstructions")] == [2]
    assert torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["step"] == 2


def test_weights_too_large_for_finite_images_stop_the_run_before_its_evaluation(flowers_root, tmp_path, capsys):
    """At --lr 1e30 one Adam step leaves the weights finite (about 1e30) but the images they make are not: the end
    of the epoch stops the run with one line, before the evaluation or TensorBoard meets the NaN images."""
    line = fails(capsys, training_main, "--data-dir", flowers_root, "--log-dir", tmp_path, "--run-name", "r", "--lr",
                 1e30, "--epochs", 3, "--batch-size", 32, *TINY[2:])  # 32 training images: one step an epoch
    assert "image grid of reconstructions became non-finite by step 1" in line and "--lr" in line, line
    assert "no checkpoint had been saved yet" in line, line
    assert load_events(tmp_path / "r").Tags()["images"] == [] and not (tmp_path / "r" / "checkpoint.pt").exists()


@pytest.mark.parametrize("split", ["a string", np.arange(1, 9).reshape(2, 4)])
def test_a_setid_mat_whose_split_is_not_a_list_of_numbers_is_named(split, tmp_path, capsys):
    root = make_flowers_root(tmp_path / "data", train=8, val=4, test=4)
    setid = root / "flowers-102" / "setid.mat"
    splits = loadmat(setid, squeeze_me=True)
    savemat(setid, {"trnid": split, "valid": splits["valid"], "tstid": splits["tstid"]})
    line = fails(capsys, training_main, "--data-dir", root, "--log-dir", tmp_path, "--epochs", 1, "--eval-split",
                 "none", *TINY)
    assert str(setid) in line and "not a list of image numbers" in line and "official setid.mat" in line, line


def test_damaged_labels_stop_the_run_before_it_trains(tmp_path, capsys):
    root = make_flowers_root(tmp_path / "data", train=16, val=4, test=8)
    (root / "flowers-102" / "imagelabels.mat").write_bytes(b"not a mat file")
    capsys.readouterr()
    assert training_main([str(a) for a in ["--data-dir", root, "--log-dir", tmp_path, "--run-name", "r",
                                           "--epochs", 1, *TINY]]) == 2
    captured = capsys.readouterr()
    assert "imagelabels.mat" in error_line(captured.err) and "epoch 1/1" not in captured.out
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_null_in_a_settings_file_means_the_default(flowers_root, tmp_path):
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"run-name": None, "latent-shape": None, "epochs": 1}))
    train("--config", settings, "--data-dir", flowers_root, "--log-dir", tmp_path / "runs", "--eval-split", "none",
          *TINY)
    assert [p.name for p in (tmp_path / "runs").iterdir()] != ["None"]  # a run named by its start time


@pytest.mark.parametrize("name", ["../escaped", "/tmp/absolute", ".", ".."])
def test_a_run_name_must_stay_inside_the_log_dir(name, flowers_root, tmp_path, capsys):
    line = fails(capsys, training_main, "--data-dir", flowers_root, "--log-dir", tmp_path / "runs", "--run-name", name,
                 "--epochs", 1, *TINY)
    assert "--run-name" in line and "not a path" in line
    assert not (tmp_path / "escaped").exists()


def test_sample_out_dir_that_is_a_file_names_out_dir(tmp_path, capsys):
    from vae_inference import main as inference_main

    a_file = tmp_path / "file.png"
    a_file.write_bytes(b"x")
    line = fails(capsys, inference_main, "sample", "--num", 2, "--out", tmp_path / "grid.png", "--out-dir", a_file)
    assert line.startswith(f"error: --out-dir {a_file} is a file") and a_file.read_bytes() == b"x"


def test_ctrl_c_in_inference_is_one_line(monkeypatch, tmp_path, capsys):
    import vae_inference

    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setitem(vae_inference.COMMANDS, "sample", interrupted)
    capsys.readouterr()
    assert vae_inference.main(["sample", "--threads", "1", "--out", str(tmp_path / "s.png")]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err


def test_a_save_killed_midway_leaves_no_temporary_file_behind(tmp_path):
    from vae.checkpoint import save_checkpoint

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f".checkpoint.pt.tmp{int(dead.stdout)}"  # what a kill -9 during a save leaves
    orphan.write_bytes(b"\0" * 1000)
    live = tmp_path / f".checkpoint.pt.tmp{os.getppid()}"  # a save in progress in another live process
    live.write_bytes(b"\0")
    save_checkpoint(tmp_path / "checkpoint.pt", model={"w": torch.zeros(2)})
    assert not orphan.exists() and live.exists() and (tmp_path / "checkpoint.pt").is_file()


@pytest.mark.parametrize("args, expected", [
    (["--fid-samples", "1"], "--fid-samples must be 0 (no FID) or at least 2"),
    (["--fid-samples", "8", "--eval-size", "1"], "need at least 2 evaluation images"),
])
def test_fid_that_cannot_be_computed_is_refused_before_training_and_leaves_no_folder(args, expected, flowers_root,
                                                                                      tmp_path, capsys):
    code = training_main([str(a) for a in ["--data-dir", flowers_root, "--log-dir", tmp_path / "runs", "--holdout",
                                           0.25, "--epochs", 1, *TINY, *args]])
    assert code == 2 and expected in error_line(capsys.readouterr().err)
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())  # no empty run folder left


def test_evaluate_refuses_fid_of_one_sample(tmp_path, capsys):
    from vae_inference import main as inference_main

    assert inference_main(["evaluate", "--fid-samples", "1"]) == 2
    assert "--fid-samples must be 0 (no FID) or at least 2" in error_line(capsys.readouterr().err)
