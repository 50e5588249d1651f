"""Checkpoints: plain dicts of tensors and JSON types that load with torch.load(..., weights_only=True).

Written atomically (temporary file in the same folder, then rename), so a kill mid-write leaves the
previous checkpoint intact.
"""

import contextlib
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from vae.errors import TrainingDiverged, UserError

FORMAT_VERSION = 1
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


def device_rng_state(device):
    """The generator state of the accelerator that trains (None on the CPU, whose state is torch's own)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    if device.type == "mps":
        return torch.mps.get_rng_state()
    return None


def set_device_rng_state(device, state):
    device = torch.device(device)
    if state is None:
        return
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    elif device.type == "mps":
        torch.mps.set_rng_state(state)


def rng_state(device="cpu"):
    """Python, numpy and torch generator states, and the training device's (so a resumed run draws the same
    numbers), as plain data."""
    numpy_state = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        # Plain ints and a tensor, never pickled bytes: restoring must not unpickle anything a file supplies.
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
        "numpy": {"keys": torch.from_numpy(numpy_state[1].astype(np.int64)), "position": int(numpy_state[2]),
                  "has_gauss": int(numpy_state[3]), "cached_gaussian": float(numpy_state[4])},
        "torch": torch.get_rng_state(),
    }
    accelerator = device_rng_state(device)
    if accelerator is not None:
        state["device"] = accelerator
    return state


class _PlainDataUnpickler(pickle.Unpickler):
    """Reads pickles of tuples, ints, floats and None only: any class or function reference is refused."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a checkpoint's RNG state")


def _python_rng_state(saved):
    if isinstance(saved, dict):
        return saved["version"], tuple(int(v) for v in saved["internal"].tolist()), saved["gauss_next"]
    # Checkpoints of format 1 written before this change stored random.getstate() as a hex-encoded pickle;
    # it is read with an unpickler that can build plain data but can never import and call anything.
    import io

    try:
        return _PlainDataUnpickler(io.BytesIO(bytes.fromhex(saved))).load()
    except (pickle.UnpicklingError, ValueError, EOFError, TypeError) as error:
        raise UserError(f"the checkpoint's Python RNG state is not plain data ({error}); "
                        f"it was not written by vae_training.py") from None


def set_rng_state(state, device="cpu"):
    try:
        random.setstate(_python_rng_state(state["python"]))
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise UserError(f"the checkpoint's Python RNG state is malformed ({error}); it was not written by "
                        f"vae_training.py") from None
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if torch.device(device).type != "cpu":  # a checkpoint from another kind of device has no state for this one
        set_device_rng_state(device, state.get("device"))


def save_checkpoint(path, **contents):
    """Write {format_version, model_type, versions, git_sha, **contents} to path atomically."""
    path = Path(path)
    # A checkpoint with NaN or infinite weights would overwrite the last good one with a run that cannot recover.
    model = contents.get("model") or {}
    broken = next((name for name, tensor in model.items() if torch.is_tensor(tensor)
                   and tensor.is_floating_point() and not torch.isfinite(tensor).all()), None)
    if broken is not None:
        raise TrainingDiverged(f"the parameter {broken} became non-finite by step {contents.get('step', '?')}")
    checkpoint = {"format_version": FORMAT_VERSION, "model_type": MODEL_TYPE, "versions": library_versions(),
                  "git_sha": git_sha(), **contents}
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(temporary, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())  # the bytes reach the disk before the rename makes them the checkpoint
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise UserError(f"cannot write checkpoint {path} ({error.strerror or error}); free some disk space or "
                        f"pass another --log-dir, then resume from the previous checkpoint") from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _allow_torch_version():
    safe_globals = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    return safe_globals([torch.torch_version.TorchVersion]) if safe_globals else contextlib.nullcontext()


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint safely (weights_only: no code in the file runs) and check it is this project's."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass the checkpoint.pt of a training run")
    try:
        # Checkpoints written before library_versions() stored str(torch.__version__) hold a TorchVersion, a
        # plain str subclass: allowing it keeps those runs loadable without allowing any code.
        with _allow_torch_version():
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise UserError(f"refusing to load {path}: it holds more than tensors and plain types "
                        f"({str(error).splitlines()[0]}); only checkpoints written by vae_training.py load") from None
    except Exception as error:
        raise UserError(f"cannot read checkpoint {path} ({type(error).__name__}: {error}); "
                        f"it is damaged or not a PyTorch file") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("model_type") != MODEL_TYPE or "config" not in checkpoint:
        raise UserError(f"{path} is not a checkpoint of this project's VAE (no model_type 'vae' and config); "
                        f"pass a checkpoint.pt written by vae_training.py")
    if checkpoint.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(f"{path} has checkpoint format {checkpoint['format_version']}, newer than this code "
                        f"({FORMAT_VERSION}); update the repository")
    return checkpoint


def restore_model(model, checkpoint, path):
    """Load the checkpoint's weights into the model its config built; a mismatch is the user's to fix."""
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        raise UserError(f"{path} does not fit the model its config describes ({str(error).splitlines()[0]}); "
                        f"it was written by another version of the code: start a new run") from None
    return model
