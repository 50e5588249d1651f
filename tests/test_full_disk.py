"""A full disk, at any point, ends in one line that says the disk is full, names the file, and gives a command that
works; nothing half-written is left behind. The disk fills through a patched writer (ENOSPC, as the kernel says
it), so the tests run anywhere; the same cases were tried on a small tmpfs."""

import builtins
import errno
import shutil
import threading
from pathlib import Path

import torch

import vae_inference
from conftest import TINY, error_line
from vae_training import main as training_main


def no_space(path=None):
    return OSError(errno.ENOSPC, "No space left on device", None if path is None else str(path))


def fails(capsys, main, *args):
    capsys.readouterr()
    assert main([str(a) for a in args]) == 2
    return error_line(capsys.readouterr().err)


def test_a_full_disk_before_training_leaves_no_folder_and_the_same_command_starts_again(flowers_root, tmp_path,
                                                                                        capsys, monkeypatch):
    import vae.run_folder

    def full(path, text):
        raise no_space(path)

    command = ["--data-dir", flowers_root, "--log-dir", tmp_path, "--run-name", "r", "--epochs", 1, *TINY]
    with monkeypatch.context() as patch:
        patch.setattr(vae.run_folder, "write_text_atomically", full)
        line = fails(capsys, training_main, *command)
    assert "cannot write" in line and "run.json (the disk is full: No space left on device)" in line, line
    assert "run the same command again" in line
    assert not (tmp_path / "r").exists()  # no folder that holds only a lock, and no 0-byte manifest
    assert training_main([str(a) for a in command]) == 0
    assert (tmp_path / "r" / "checkpoint.pt").is_file()


def test_a_full_disk_at_the_first_checkpoint_names_the_saved_one_and_resume_auto_goes_on(flowers_root, tmp_path,
                                                                                        capsys, monkeypatch):
    """best.pt fits on the disk, checkpoint.pt does not: the line names best.pt, and --resume auto, once there is
    room, resumes from it (it used to start the run, then refuse its folder, forever)."""
    import vae.checkpoint

    def open_on_a_full_disk(path, mode="r", *args, **kwargs):
        if Path(path).name.startswith(".checkpoint.pt") and "w" in mode:
            raise no_space(path)
        return builtins.open(path, mode, *args, **kwargs)

    command = ["--data-dir", flowers_root, "--log-dir", tmp_path, "--run-name", "r", "--epochs", 2, *TINY]
    with monkeypatch.context() as patch:
        patch.setattr(vae.checkpoint, "open", open_on_a_full_disk, raising=False)
        line = fails(capsys, training_main, *command)
    run = tmp_path / "r"
    assert "the disk is full" in line and f"--resume {run / 'best.pt'}" in line, line
    assert sorted(p.name for p in run.glob("*.pt")) == ["best.pt"]  # no temporary file left
    assert training_main([str(a) for a in command + ["--resume", "auto"]]) == 0
    assert "resuming from best.pt" in capsys.readouterr().out
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 2


def test_a_full_disk_while_saving_a_resumed_run_keeps_its_checkpoint_and_quotes_the_resume(flowers_root, tmp_path,
                                                                                           capsys, monkeypatch):
    import vae.checkpoint

    run_dir = tmp_path / "my runs" / "full"  # a space: the resume command quotes it
    assert training_main([str(a) for a in ["--data-dir", flowers_root, "--epochs", 1, "--log-dir", run_dir.parent,
                                           "--run-name", "full", "--eval-split", "none", *TINY]]) == 0
    good = (run_dir / "checkpoint.pt").read_bytes()

    def open_on_a_full_disk(path, mode="r", *args, **kwargs):
        if "w" in mode:
            raise no_space(path)
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(vae.checkpoint, "open", open_on_a_full_disk, raising=False)
    line = fails(capsys, training_main, "--resume", run_dir / "checkpoint.pt", "--epochs", 2)
    assert "the disk is full" in line and f"--resume '{run_dir / 'checkpoint.pt'}'" in line, line
    assert (run_dir / "checkpoint.pt").read_bytes() == good
    assert not [p for p in run_dir.iterdir() if ".tmp" in p.name]

    # A new run whose first save fails: nothing to resume, so the line names no file but says how to start again.
    command = ["--data-dir", flowers_root, "--epochs", 1, "--log-dir", tmp_path, "--run-name", "none-saved",
               "--eval-split", "none", *TINY]
    line = fails(capsys, training_main, *command)
    assert "no checkpoint of this run was saved yet" in line and "--resume auto" in line, line
    monkeypatch.undo()
    assert training_main([str(a) for a in command + ["--resume", "auto"]]) == 0


def test_an_export_onto_a_full_disk_names_the_file_not_a_training_resume(checkpoint, tmp_path, capsys, monkeypatch):
    import vae.checkpoint

    def open_on_a_full_disk(path, mode="r", *args, **kwargs):
        raise no_space(path)

    monkeypatch.setattr(vae.checkpoint, "open", open_on_a_full_disk, raising=False)
    out = tmp_path / "small.pt"
    line = fails(capsys, vae_inference.main, "export", "--checkpoint", checkpoint, "--out", out)
    assert f"cannot write {out} (the disk is full" in line and "vae_training" not in line, line
    assert list(tmp_path.iterdir()) == []


def test_the_projector_on_a_full_disk_is_one_line_without_tensorboards_thread_traceback(checkpoint, flowers_root,
                                                                                          tmp_path, capsys,
                                                                                          monkeypatch):
    """TensorBoard writes events from a thread of its own: its failure is the command's one line, and the folder
    the command created is gone."""
    def events_thread_fails(writer, *args):
        thread = threading.Thread(target=lambda: (_ for _ in ()).throw(no_space(Path(writer.log_dir) / "events")))
        thread.start()
        thread.join()

    monkeypatch.setattr(vae_inference, "log_projector", events_thread_fails)
    out = tmp_path / "projector"
    line = fails(capsys, vae_inference.main, "projector", "--checkpoint", checkpoint, "--data-dir", flowers_root,
                 "--split", "val", "--log-dir", out)
    assert "the disk is full" in line and "--log-dir" in line, line
    assert not out.exists()


def test_an_image_cache_on_a_full_disk_is_left_out_and_training_goes_on(flowers_root, tmp_path, capsys,
                                                                        monkeypatch):
    """torch's zip writer reports a full disk as a RuntimeError; the cache is written from memory, so the OSError
    reaches the fallback: a warning, and the images are decoded again next time."""
    def full(self, data):
        raise no_space(self)

    monkeypatch.setattr(Path, "write_bytes", full)
    root = tmp_path / "flowers"
    shutil.copytree(flowers_root, root)
    for cache in root.rglob("*.pt"):
        cache.unlink()
    assert training_main([str(a) for a in ["--data-dir", root, "--log-dir", tmp_path / "runs", "--epochs", 1,
                                           "--cache-dir", tmp_path / "cache", *TINY]]) == 0
    err = capsys.readouterr().err
    assert "could not write the image cache" in err and "No space left on device" in err, err
