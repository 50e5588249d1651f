"""Data-parallel training with PyTorch's own engine: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE, and
torch.distributed does the rest (NCCL between GPUs, gloo between CPU processes).

    torchrun --standalone --nproc-per-node 2 vae_training.py ...

Without torchrun (WORLD_SIZE unset) everything here is a no-op for a single process.
"""

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from vae.errors import UserError
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


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def main_process_first(process):
    """Run the block on the main process first (it builds the image cache), then on the others (they load it)."""
    if not process.is_main:
        barrier()
    yield
    if process.is_main:
        barrier()


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
