"""Random number generator state: what a checkpoint saves so a resumed run draws the numbers it would have.

Only torch's generators are saved (the CPU one, and the training device's): nothing in a run draws from
Python's `random` or numpy's global generator.
"""

import torch

from vae.errors import UserError


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
    """{"torch": CPU state, "device": the accelerator's state (absent on the CPU)}: tensors only."""
    state = {"torch": torch.get_rng_state()}
    accelerator = device_rng_state(device)
    if accelerator is not None:
        state["device"] = accelerator
    return state


def set_rng_state(state, device="cpu", path="the checkpoint"):
    """Restore what rng_state saved (older checkpoints also hold Python and numpy states: nothing uses them).
    A state that is not one is a UserError naming the checkpoint's path."""
    try:
        torch.set_rng_state(state["torch"])
        if torch.device(device).type != "cpu":  # a checkpoint from another kind of device has no state for this one
            set_device_rng_state(device, state.get("device"))
    except (KeyError, TypeError, RuntimeError) as error:
        raise UserError(f"{path} has a malformed RNG state ({error}); it was not written by this project's "
                        f"training") from None
