"""Never lose a run: run folders are claimed, a resume writes only into its own folder or a new one, data
that moved can be resumed, and a failed save keeps the last good checkpoint. Through vae_training.main, in
this process."""

import shutil

import pytest
import torch

from conftest import TINY, error_line, train
from vae.run_folder import claim
from vae_training import main


@pytest.fixture(scope="module")
def two_runs(flowers_root, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("folders")
    for name in ("A", "B"):
        train("--data-dir", flowers_root, "--epochs", 1, "--log-dir", log_dir, "--run-name", name, "--eval-split",
              "none", *TINY)
    return log_dir


def snapshot(folder):
    return {path.relative_to(folder): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def failed(capsys, *args):
    """main(args) must fail with one error line: that line."""
    capsys.readouterr()
    assert main([str(a) for a in args]) == 2
    return error_line(capsys.readouterr().err)


def test_resuming_into_another_runs_folder_is_refused_and_changes_nothing(two_runs, capsys):
    before = snapshot(two_runs / "B")
    line = failed(capsys, "--resume", two_runs / "A" / "checkpoint.pt", "--run-name", "B", "--epochs", 2)
    assert str(two_runs / "B") in line and str(two_runs / "A") in line
    assert snapshot(two_runs / "B") == before


def test_a_copied_folder_resumed_with_log_dir_never_writes_into_the_original(two_runs, tmp_path, capsys):
    copy = tmp_path / "copies" / "A-copy"
    shutil.copytree(two_runs / "A", copy)
    original = snapshot(two_runs / "A")
    # --log-dir alone keeps the run's name, A: the original's folder, which holds another run.
    line = failed(capsys, "--resume", copy / "checkpoint.pt", "--log-dir", two_runs, "--epochs", 2)
    assert str(two_runs / "A") in line and str(copy) in line
    assert snapshot(two_runs / "A") == original
    train("--resume", copy / "checkpoint.pt", "--epochs", 2)  # its own folder: fine
    assert torch.load(copy / "checkpoint.pt", weights_only=True)["epoch"] == 2
    assert snapshot(two_runs / "A") == original


def test_a_new_run_never_takes_a_folder_that_holds_anything(flowers_root, tmp_path, capsys):
    folder = tmp_path / "only-best"
    folder.mkdir()
    (folder / "best.pt").write_bytes(b"a best checkpoint")
    line = failed(capsys, "--data-dir", flowers_root, "--log-dir", tmp_path, "--run-name", "only-best", *TINY)
    assert str(folder) in line and "--resume" in line
    assert (folder / "best.pt").read_bytes() == b"a best checkpoint"


def test_a_folder_in_use_by_another_training_is_refused(flowers_root, tmp_path, capsys):
    run_dir, lock = claim(tmp_path, "busy")  # what a training that is running holds
    try:
        line = failed(capsys, "--data-dir", flowers_root, "--log-dir", tmp_path, "--run-name", "busy", *TINY)
        assert "another training" in line and str(run_dir) in line
    finally:
        lock.close()


def test_default_names_started_in_the_same_second_get_their_own_folders(tmp_path):
    claims = [claim(tmp_path, None) for _ in range(3)]
    folders = {run_dir for run_dir, _ in claims}
    assert len(folders) == 3
    for _, lock in claims:
        lock.close()


def test_a_run_whose_data_moved_resumes_with_the_new_data_dir(flowers_root, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(flowers_root, data)
    train("--data-dir", data, "--epochs", 1, "--log-dir", tmp_path, "--run-name", "moved", "--eval-split", "none",
          *TINY)
    moved = tmp_path / "elsewhere"
    data.rename(moved)
    line = failed(capsys, "--resume", tmp_path / "moved" / "checkpoint.pt", "--epochs", 2)
    assert str(data / "flowers-102") in line and "--data-dir" in line
    assert not data.exists(), "nothing was downloaded into the old place"
    train("--resume", tmp_path / "moved" / "checkpoint.pt", "--epochs", 2, "--data-dir", moved)
    assert torch.load(tmp_path / "moved" / "checkpoint.pt", weights_only=True)["epoch"] == 2


