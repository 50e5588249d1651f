"""Data-parallel training with PyTorch's own engine: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE, and
torch.distributed does the rest (NCCL between GPUs, gloo between CPU processes).

    torchrun --standalone --nproc-per-node 2 vae_training.py ...

Without torchrun (WORLD_SIZE unset) everything here is a no-op for a single process.
"""

import contextlib
import json
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from vae.errors import EveryProcessError, UserError
from vae.device import pick_device


@dataclass
class Process:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        """Only the main process writes TensorBoard events, checkpoints, progress bars and messages."""
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


def setup(device_name="auto") -> Process:
    """Pick the device once; under torchrun also join the process group (one GPU per process)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name)
    if world_size == 1:
        return Process(0, 1, device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"process {rank} wants GPU {local_rank} but only {torch.cuda.device_count()} are "
                            f"visible; lower --nproc-per-node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise UserError(f"torch.distributed does not run on {device.type}; use --device cuda or --device cpu")
    dist.init_process_group(backend=backend)
    return Process(rank, world_size, device)


def teardown():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def peer_lost(error):
    """Whether `error` is a collective operation that failed because another process of the run is gone (killed,
    or ended by an error of its own): gloo raises a RuntimeError from its transport, NCCL a DistBackendError."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    return isinstance(error, getattr(dist, "DistError", ())) or "gloo" in str(error) or "NCCL" in str(error)


def all_reduce_sum(tensor):
    """Sum a tensor over all processes in place (unchanged for a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_process(flag, device):
    """True on every process when `flag` is true on any: all processes stop at the same step."""
    if not (dist.is_available() and dist.is_initialized()):
        return bool(flag)
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=device)).item() > 0)


@contextlib.contextmanager
def main_process_first(process):
    """Run the block on the main process first (it builds the image cache), then on the others (they load it). A
    UserError on the main process is raised on every process, instead of leaving the others waiting for it."""
    if process.is_main:
        with errors_of_the_main_process(process):
            yield
    else:
        error = broadcast_object(None)  # the main process's outcome, once its block has ended
        if error is not None:
            raise EveryProcessError(error)
        yield


@contextlib.contextmanager
def errors_of_the_main_process(process):
    """Around work that only the main process does (every process enters the block; the others learn the outcome
    when it ends there): a UserError on the main process is raised on every process, as EveryProcessError, which
    each prints before they exit together."""
    error = None
    try:
        yield
    except UserError as caught:
        if not (process.distributed and process.is_main):
            raise
        error = str(caught)
    if process.distributed:
        error = broadcast_object(error)
    if error is not None:
        raise EveryProcessError(error)


def report_error(message):
    """Under torchrun, the process's one-line error for the launcher's failure report (TORCHELASTIC_ERROR_FILE), so
    that the report ends with it instead of a pointer to the documentation."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        with open(path, "w") as file:
            # The launcher prints "py_callstack" as the failure's traceback: here, the one line.
            json.dump({"message": {"message": message, "extraInfo": {"py_callstack": message,
                                                                     "timestamp": str(int(time.time()))}}}, file)


def end_with_error(message, on_every_process):
    """The end of a process that printed its one-line error. When every process met it (EveryProcessError),
    torchrun's failure report must name process 0 as the root cause, with this line: so process 0 reports first
    and exits first, and the others report after it and wait for the launcher to stop them."""
    together = on_every_process and dist.is_available() and dist.is_initialized()
    if not together or dist.get_rank() == 0:
        report_error(message)
    if together:
        dist.barrier()  # every process has said it, and process 0 has reported
        if dist.get_rank() != 0:
            report_error(message)
            time.sleep(10)  # torchrun stops this process as soon as process 0 has exited


def replicas_in_sync(model, device):
    """True when every process holds exactly the parameters of process 0 (DDP's invariant, checked)."""
    if not (dist.is_available() and dist.is_initialized()):
        return True
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).to(device)
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    return not any_process(not torch.equal(flat, reference), device)


def broadcast_object(value):
    """Process 0's value on every process (e.g. a run name made from the clock)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
