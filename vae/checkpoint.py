"""Checkpoints: plain dicts of tensors and JSON types that load with torch.load(..., weights_only=True).

Written atomically (temporary file in the same folder, then rename), so a kill mid-write leaves the
previous checkpoint intact.
"""

import contextlib
import io
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch

from datasets.flowers102 import flowers_folder
from datasets.folders import is_image_folder
from vae.config import TrainConfig, resumed_config
from vae.errors import ResumableError, TrainingDiverged, UserError
from vae.files import disk_full
from vae.vae import build_model, rename_old_keys

# 2: the learned log sigma is likelihood.raw_log_sigma (it was raw_log_sigma), and `schedule` holds the
# learning-rate schedule (it held the KL schedule, which is a function of the step, beside lr_schedule).
FORMAT_VERSION = 2
MODEL_TYPE = "vae"


def unwrap(model):
    """The plain model under DistributedDataParallel and torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def git_sha():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def library_versions():
    import torchvision

    return {"python": sys.version.split()[0], "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__),
            "numpy": np.__version__}


def _remove_orphaned_temporaries(path):
    """Delete the half-written .NAME.tmpPID files of saves whose process is gone (a kill -9 during a save)."""
    for temporary in path.parent.glob(f".{path.name}.tmp*"):
        pid = temporary.name.rsplit(".tmp", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _process_exists(int(pid)):
            temporary.unlink(missing_ok=True)


def _process_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, under another user
        return True
    return True


def first_non_finite(tensors):
    """The name of the first floating-point tensor of `tensors` (a dict) with a NaN or infinite value, or None."""
    return next((name for name, tensor in tensors.items() if torch.is_tensor(tensor)
                 and tensor.is_floating_point() and not torch.isfinite(tensor).all()), None)


def check_finite(tensors, step, kind="parameter"):
    """Raise TrainingDiverged naming the first floating-point tensor of `tensors` (a dict, such as a state dict)
    with a NaN or infinite value: "the {kind} {name} became non-finite by step {step}"."""
    broken = first_non_finite(tensors)
    if broken is not None:
        raise TrainingDiverged(f"the {kind} {broken} became non-finite by step {step}")


def save_checkpoint(path, for_resume=True, **contents):
    """Write {format_version, model_type, versions, git_sha, **contents} to path atomically. A failed write of a
    training's checkpoint (for_resume) names the last good checkpoint beside it, which resumes the run."""
    path = Path(path)
    # A checkpoint with NaN or infinite weights would overwrite the last good one with a run that cannot recover.
    check_finite(contents.get("model") or {}, contents.get("step", "?"))
    checkpoint = {"format_version": FORMAT_VERSION, "model_type": MODEL_TYPE, "versions": library_versions(),
                  "git_sha": git_sha(), **contents}
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    _remove_orphaned_temporaries(path)
    # The bytes are made in memory first: torch's zip writer reports a full disk as "unexpected pos ...", a plain
    # write as the OSError that names it.
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    try:
        with open(temporary, "wb") as file:
            file.write(buffer.getbuffer())
            file.flush()
            os.fsync(file.fileno())  # the bytes reach the disk before the rename makes them the checkpoint
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        reason = f"the disk is full: {error.strerror}" if disk_full(error) else error.strerror or str(error)
        if not for_resume:
            raise UserError(f"cannot write {path} ({reason}); nothing was written there. Free some disk space, or "
                            f"pass another path") from None
        last_good = next((kept for kept in (path.with_name("checkpoint.pt"), path.with_name("best.pt"))
                          if kept.is_file()), None)
        if last_good is None:
            raise ResumableError(f"cannot write checkpoint {path} ({reason}); no checkpoint of this run was saved "
                                 f"yet. Free some disk space, then run the same command with --resume auto (it "
                                 f"starts the run again in its folder)", None) from None
        kept = "its previous version is kept" if last_good == path else \
            f"the last good checkpoint, {last_good}, is kept"
        raise ResumableError(f"cannot write checkpoint {path} ({reason}); {kept}. Free some disk space, then resume "
                             f"it", last_good) from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _allow_torch_version():
    safe_globals = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    return safe_globals([torch.torch_version.TorchVersion]) if safe_globals else contextlib.nullcontext()


# The first bytes of the files most often passed by mistake: what each is.
FILE_SIGNATURES = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
                   (b"BM", "a BMP image"), (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"),
                   (b"\x80", "a pickle, as torch.save wrote before PyTorch 1.6"), (b"\x93NUMPY", "a NumPy array"),
                   (b"\x89HDF", "an HDF5 file"), (b"\x1f\x8b", "a gzip archive"))


def what_it_seems(path):
    """A few words on what a file that is no checkpoint seems to be, from its first bytes."""
    with open(path, "rb") as file:
        head = file.read(512)
    if not head:
        return "it is empty"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "it seems to be a WebP image"
    for signature, kind in FILE_SIGNATURES:
        if head.startswith(signature):
            return f"it seems to be {kind}"
    try:
        text = head.decode("utf-8").lstrip()
    except UnicodeDecodeError:
        return "it holds binary data of another kind"
    if text[:1] in ("{", "["):
        return "it seems to be JSON, such as a run folder's run.json"
    return "it seems to be text"


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint safely (weights_only: no code in the file runs) and check it is this project's."""
    path = Path(path)
    if path.is_dir():
        inside = " (it holds one)" if (path / "checkpoint.pt").is_file() else ""
        raise UserError(f"checkpoint {path} is a folder; pass the checkpoint.pt inside a run folder{inside}")
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass the checkpoint.pt of a training run")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is no checkpoint of ours
        raise UserError(f"{path} is not a PyTorch checkpoint ({what_it_seems(path)}, not the zip archive torch.save "
                        f"writes); pass the checkpoint.pt of a training run")
    try:
        # Checkpoints written before library_versions() stored str(torch.__version__) hold a TorchVersion, a
        # plain str subclass: allowing it keeps those runs loadable without allowing any code.
        with _allow_torch_version():
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # PyTorch's own message suggests weights_only=False, which would run whatever code the file holds.
        raise UserError(f"refusing to load {path}: it holds Python objects besides tensors and plain types, "
                        f"which this project's checkpoints never do, and loading them could run code; pass a "
                        f"checkpoint written by this project's training") from None
    except Exception as error:
        raise UserError(f"cannot read checkpoint {path} ({type(error).__name__}: {error}); "
                        f"it is damaged or not a PyTorch file") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("model_type") != MODEL_TYPE or "config" not in checkpoint:
        raise UserError(f"{path} is not a checkpoint of this project's VAE (no model_type 'vae' and config); "
                        f"pass a checkpoint.pt written by this project's training")
    version = checkpoint.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise UserError(f"{path} is damaged: its format_version is {version!r}, not a whole number; use another "
                        f"checkpoint")
    if version > FORMAT_VERSION:
        raise UserError(f"{path} has checkpoint format {version}, newer than this code ({FORMAT_VERSION}); update "
                        f"the repository")
    for key in ("model", "ema_model", "samplers"):
        if key in checkpoint and not isinstance(checkpoint[key], dict):
            raise UserError(f"{path} is damaged: its {key} is a {type(checkpoint[key]).__name__}, not a dict; use "
                            f"another checkpoint")
    return checkpoint


def check_weights(config, checkpoint, path, key="model"):
    """Before any memory is allocated for it: checkpoint[key] holds exactly the tensors, with the shapes, of the
    model that config builds (built on the meta device, so an absurd width costs nothing), all of them finite."""
    if key not in checkpoint:
        raise UserError(f"{path} has no {key} weights; pass a checkpoint written by this project's training")
    with torch.device("meta"):
        expected = {name: tuple(tensor.shape) for name, tensor in build_model(config).state_dict().items()}
    weights = dict(checkpoint[key])
    rename_old_keys(weights, "")  # what loading does for checkpoints of older versions
    for name, shape in expected.items():
        tensor = weights.get(name)
        if not torch.is_tensor(tensor) or tuple(tensor.shape) != shape:
            found = f"shape {tuple(tensor.shape)}" if torch.is_tensor(tensor) else \
                "nothing" if tensor is None else type(tensor).__name__
            raise UserError(f"{path} does not fit the model its config describes ({name}: {found}, expected shape "
                            f"{shape}); it is damaged or was written by another version of the code: use another "
                            f"checkpoint or start a new run")
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        raise UserError(f"{path} does not fit the model its config describes (unexpected weights "
                        f"{', '.join(unexpected[:3])}); it is damaged or was written by another version of the code: "
                        f"use another checkpoint or start a new run")
    broken = first_non_finite(weights)
    if broken is not None:
        raise UserError(f"{path} is damaged: its weight {broken} holds NaN or infinite values; use another "
                        f"checkpoint (a run's best.pt, or an earlier export)")


def restore_model(model, checkpoint, path, key="model"):
    """Load the checkpoint's weights (checkpoint[key]: "model", or "ema_model" for the moving average) into the
    model its config built; a mismatch is the user's to fix."""
    try:
        model.load_state_dict(checkpoint[key])
    except RuntimeError as error:
        raise UserError(f"{path} does not fit the model its config describes ({str(error).splitlines()[0]}); "
                        f"it was written by another version of the code: start a new run") from None
    return model


def checkpoint_to_resume(resume, config, explicit):
    """(checkpoint, its path, the config to continue with) for --resume (a path, or "auto": the run's own
    checkpoint.pt), or (None, None, config) for a new run."""

    if not resume:
        return None, None, config
    if resume == "auto":
        if not config.run_name:
            raise UserError("--resume auto needs --run-name to find LOG_DIR/RUN_NAME/checkpoint.pt")
        path = Path(config.log_dir) / config.run_name / "checkpoint.pt"
        if not path.exists() and path.with_name("best.pt").is_file():
            # The run's first checkpoint.pt failed to save (a full disk) after best.pt had: go on from that.
            path = path.with_name("best.pt")
            print(f"no checkpoint.pt in {path.parent}: resuming from {path.name}, the run's last saved state")
        elif not path.exists():
            print(f"no checkpoint at {path} yet: starting the run")
            return None, None, config
    else:
        path = Path(resume)
    checkpoint = load_checkpoint(path)
    missing = [key for key in ("model", "optimizer", "schedule", "rng", "epoch", "step", "batch")
               if key not in checkpoint]
    if missing:
        raise UserError(f"{path} cannot be resumed: it has no {', '.join(missing)} (inference can still use it); "
                        f"start a new run")
    config = resumed_config(checkpoint["config"], config, explicit, path)
    for key in ("model", "ema_model")[:1 + ("ema_model" in checkpoint)]:
        check_weights(config, checkpoint, path, key)
    in_own_folder = not {"log_dir", "run_name"} & set(explicit)
    latest = path.parent / "checkpoint.pt"
    if in_own_folder and path.name != "checkpoint.pt" and latest.exists():
        # best.pt (or a copy) is an earlier state of the run whose checkpoint.pt is beside it: going on in that
        # folder would write the earlier state over checkpoint.pt and its later steps.
        raise ResumableError(f"{path} is an earlier state (step {checkpoint['step']}) of the run in {path.parent}; "
                             f"resuming it there would rewind {latest}. Start a new run from {path.name} with "
                             f"--run-name NEW, or continue the run", latest)
    if config.epochs < checkpoint["epoch"]:
        raise UserError(f"{path} has trained {checkpoint['epoch']} epochs already; --epochs {config.epochs} is "
                        f"fewer: pass --epochs {checkpoint['epoch']} or more (the total, not the epochs to add)")
    if in_own_folder:  # the run goes on in the checkpoint's own folder
        config.log_dir, config.run_name = str(path.parent.parent), path.parent.name
    data_folder = flowers_folder(config.data_dir)
    # Never download into a folder that moved away.
    if "data_dir" not in explicit and not data_folder.is_dir() and not is_image_folder(config.data_dir):
        raise UserError(f"{path} was trained on data in {data_folder}, which is not there any more; pass "
                        f"--data-dir with the folder that holds flowers-102/ (or the images) now")
    return checkpoint, path, config


def finished(checkpoint, config):
    """Whether a checkpoint's run has done all of config.epochs and its end (the samplers fitted at the end)."""
    return checkpoint["epoch"] >= config.epochs and bool(checkpoint.get("samplers"))


# Settings that are paths of the machine a run trained on: an export, made to be shared, keeps their defaults.
MACHINE_PATHS = ("data_dir", "cache_dir", "log_dir")


def half_network(state):
    """A sampler's state with the floating-point tensors of its "network" (if any) in float16."""
    if not isinstance(state, dict) or not isinstance(state.get("network"), dict):
        return state
    return {**state, "network": {name: value.half() if value.is_floating_point() else value
                                 for name, value in state["network"].items()}}


def export_for_inference(checkpoint, path):
    """Write a small checkpoint for inference and sharing: the weights inference uses (the moving average's when
    the run had --ema), the config (its folders, MACHINE_PATHS, set back to their defaults), the run's last
    evaluation and latent samplers, epoch, step, and the versions and git commit that trained it. No optimizer or
    RNG state: it cannot be resumed. The samplers' networks are stored in float16 (half the bytes; they are loaded
    into float32 networks; a sample moves by about 3e-4 of its norm)."""
    weights = checkpoint.get("ema_model", checkpoint["model"])
    kept = {key: checkpoint[key] for key in ("eval", "samplers", "epoch", "step", "versions", "git_sha")
            if key in checkpoint}
    if kept.get("samplers"):
        kept["samplers"] = {name: half_network(state) for name, state in kept["samplers"].items()}
    save_checkpoint(path, for_resume=False, model={name: tensor.clone() for name, tensor in weights.items()},
                    config={**checkpoint["config"], **{name: getattr(TrainConfig, name) for name in MACHINE_PATHS}},
                    **kept)
