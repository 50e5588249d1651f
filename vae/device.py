"""Where tensors live: the device is picked once per run, and helpers ask a model where it is."""

import torch

from vae.errors import UserError

DEVICES = ("auto", "cpu", "cuda", "mps")


def pick_device(name="auto") -> torch.device:
    """auto: cuda, then mps, then cpu. Asking for a device that is not there is an error, never a fallback."""
    mps = getattr(torch.backends, "mps", None)
    available = {"cuda": torch.cuda.is_available(), "mps": bool(mps and mps.is_available()), "cpu": True}
    if name == "auto":
        name = next(kind for kind in ("cuda", "mps", "cpu") if available[kind])
    if not available.get(name, False):
        raise UserError(f"--device {name} was asked for but PyTorch sees no {name} device here; "
                        f"use --device auto or --device cpu")
    return torch.device(name)


def model_device(model) -> torch.device:
    """The device the model's parameters are on."""
    return next(model.parameters()).device


def sum_dtype(device) -> torch.dtype:
    """float64 for sums over a whole split, except on MPS, which has none."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def native_bf16():
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX); without it bf16 is emulated."""
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
