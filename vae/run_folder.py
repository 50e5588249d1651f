"""Run folders: where a training writes, claimed so that no two trainings and no two runs ever share one.

A training writes only into the folder of the checkpoint it resumes, or into a new, empty folder. The claim
is an exclusive lock on RUN/.lock held for the whole training (fcntl.flock: the operating system releases it
when the process ends, however it ends, so a crash never leaves a stale claim).
"""

import dataclasses
import json
import shlex
import shutil
import sys
from datetime import datetime
from pathlib import Path

from vae.checkpoint import git_sha, library_versions
from vae.errors import UserError
from vae.files import write_text_atomically

try:
    import fcntl
except ImportError:  # Windows: folders are still checked, but two simultaneous trainings are not detected
    fcntl = None

LOCK_NAME = ".lock"


def _lock(run_dir):
    """Open and lock RUN/.lock; the open file (kept open for the run) or None when another process holds it."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(run_dir / LOCK_NAME, "a")
    except OSError as error:
        raise UserError(f"cannot write the run folder {run_dir} ({error.strerror or error}); "
                        f"pass a writable --log-dir") from None
    if fcntl is not None:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return None
    return handle


def _holds_a_run(run_dir):
    return any(path.name != LOCK_NAME for path in run_dir.iterdir())


def release_unsaved(run_dir, lock):
    """Unlock run_dir, a folder this training created, and remove it when nothing of the run was saved in it (it
    holds only what holds_unsaved_run allows: its lock, manifest and TensorBoard events): a run refused, or stopped
    by a full disk, before its first checkpoint leaves no folder behind."""
    lock.close()
    if not run_dir.is_dir() or (_holds_a_run(run_dir) and not holds_unsaved_run(run_dir)):
        return
    try:
        for path in run_dir.iterdir():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        run_dir.rmdir()
    except OSError:  # something appeared meanwhile: leave it
        pass


def holds_unsaved_run(run_dir):
    """Whether run_dir holds only what a training writes before its first checkpoint (its manifests and
    TensorBoard events): a run killed before it saved anything, which may start again in place."""
    def before_first_save(path):
        return (path.name in (LOCK_NAME, "run.json") or path.name.startswith(("run-resumed-", "events.out.tfevents."))
                or (path.is_dir() and path.name.startswith("loss_")
                    and all(p.name.startswith("events.out.tfevents.") for p in path.iterdir())))
    return run_dir.is_dir() and _holds_a_run(run_dir) and all(before_first_save(p) for p in run_dir.iterdir())


def claim(log_dir, run_name, resumed_from=None, restart_unsaved=False):
    """(run folder, its lock) for a training. run_name None: a new name from the clock, with a numbered suffix
    when a run started in the same second took it. Resuming, the folder must be the checkpoint's own folder
    or a new, empty one; a new run needs a new or empty folder, or with restart_unsaved (--resume auto) one whose
    run was killed before it saved (holds_unsaved_run). Anything else is a UserError naming both."""
    if run_name is None:
        stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        for suffix in ["", *(f"-{n}" for n in range(2, 1000))]:
            run_dir = Path(log_dir) / (stamp + suffix)
            if run_dir.exists() and _holds_a_run(run_dir):
                continue
            lock = _lock(run_dir)
            if lock is not None and not _holds_a_run(run_dir):
                return run_dir, lock
            if lock is not None:
                lock.close()
        raise UserError(f"could not find a free run folder in {log_dir}; pass --run-name")
    run_dir = Path(log_dir) / run_name
    own_folder = resumed_from is not None and run_dir.resolve() == Path(resumed_from).parent.resolve()
    lock = _lock(run_dir)
    if lock is None:
        raise UserError(f"another training is running in {run_dir} right now; wait for it to end or pass "
                        f"another --run-name")
    if restart_unsaved and resumed_from is None and holds_unsaved_run(run_dir):
        print(f"{run_dir} holds a run that was stopped before its first checkpoint: starting it again there")
        return run_dir, lock
    if not own_folder and _holds_a_run(run_dir):
        lock.close()
        if resumed_from is not None:
            raise UserError(f"{run_dir} holds another run: resuming {resumed_from} writes only into "
                            f"{Path(resumed_from).parent} or a new folder; drop --log-dir/--run-name or name a "
                            f"new one")
        raise UserError(f"{run_dir} already holds a run; continue it with --resume auto --log-dir "
                        f"{shlex.quote(str(log_dir))} --run-name {shlex.quote(run_name)}, or start a new one under "
                        f"another --run-name")
    return run_dir, lock


def write_manifest(run_dir, config, resumed_from=None):
    """run.json: the settings, library versions, git commit, command line and start time. A resumed run keeps
    the original and writes run-resumed-<time>.json beside it."""
    manifest = {"config": dataclasses.asdict(config), "versions": library_versions(), "git_sha": git_sha(),
                "command": sys.argv, "started": datetime.now().astimezone().isoformat(timespec="seconds"),
                "resumed_from": str(resumed_from) if resumed_from else None}
    name = "run.json" if not resumed_from else f"run-resumed-{datetime.now():%Y%m%d-%H%M%S}.json"
    write_text_atomically(run_dir / name, json.dumps(manifest, indent=2) + "\n")
