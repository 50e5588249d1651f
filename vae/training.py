"""Pieces of the training script that tests and the notebook import: device choice, validation, signals."""

import contextlib
import math
import os
import signal
import time

import torch

from vae.checkpoint import device_rng_state, set_device_rng_state
from vae.config import default_channels
from vae.errors import UserError
from vae.vae import MIN_LOG_SIGMA


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


def gradient_norm(parameters):
    """The L2 norm of all gradients together (a diagnostic; unlike clip_grad_norm_ it leaves them untouched)."""
    norms = [torch.linalg.vector_norm(p.grad) for p in parameters if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


def validate_config(config):
    """Reject impossible settings before any data is read, with the flag to change."""
    channels = config.channels or default_channels(config.resolution)
    factor = 2 ** len(channels)
    checks = [
        (config.resolution >= 8 and config.resolution % 8 == 0,
         f"--resolution must be a positive multiple of 8, got {config.resolution}"),
        (config.resolution % factor == 0,
         f"--resolution {config.resolution} must be divisible by {factor} for {len(channels)} stages "
         f"(--channels {' '.join(map(str, channels))})"),
        (config.latent_size >= 1, f"--latent-size must be at least 1, got {config.latent_size}"),
        (config.beta >= 0, f"--beta must be >= 0, got {config.beta}"),
        (config.sigma > 0, f"--sigma must be > 0, got {config.sigma}"),
        (config.sigma <= 0 or config.likelihood != "gaussian-learned" or math.log(config.sigma) > MIN_LOG_SIGMA,
         f"--sigma {config.sigma} is below the floor of the learned sigma ({math.exp(MIN_LOG_SIGMA):.4f}); "
         f"start higher"),
        (config.free_bits >= 0, f"--free-bits must be >= 0, got {config.free_bits}"),
        (0 < config.kl_ratio <= 1, f"--kl-ratio must be in (0, 1], got {config.kl_ratio}"),
        (config.kl_cycles >= 1, f"--kl-cycles must be at least 1, got {config.kl_cycles}"),
        (config.kl_warmup_epochs >= 0, f"--kl-warmup-epochs must be >= 0, got {config.kl_warmup_epochs}"),
        (config.sigma_lr > 0, f"--sigma-lr must be > 0, got {config.sigma_lr}"),
        (config.lr > 0, f"--lr must be > 0, got {config.lr}"),
        (config.batch_size >= 1, f"--batch-size must be at least 1, got {config.batch_size}"),
        (config.batch_size % int(os.environ.get("WORLD_SIZE", "1")) == 0,
         f"--batch-size {config.batch_size} (the global batch) must be divisible by the "
         f"{os.environ.get('WORLD_SIZE')} processes torchrun started"),
        (config.epochs >= 1, f"--epochs must be at least 1, got {config.epochs}"),
        (config.max_steps >= 0, f"--max-steps must be >= 0, got {config.max_steps}"),
        (0 <= config.holdout < 1, f"--holdout must be in [0, 1), got {config.holdout}"),
        (config.eval_size >= 0, f"--eval-size must be >= 0, got {config.eval_size}"),
        (config.grid_size >= 1, f"--grid-size must be at least 1, got {config.grid_size}"),
        (all(c >= 1 for c in channels), f"--channels must be positive, got {channels}"),
        (config.holdout == 0 or config.eval_split == "test" or config.eval_split == "none",
         "--holdout replaces --eval-split; pass only one of them"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step, so the step finishes and a
    checkpoint is written before the process exits (130 for SIGINT, 143 for SIGTERM, as shells expect)."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.signal = signum

    @property
    def requested(self):
        return self.signal is not None

    @property
    def exit_code(self):
        return 128 + self.signal


class Timer:
    """True every `minutes` minutes (never when minutes <= 0): paces the periodic checkpoints."""

    def __init__(self, minutes):
        self.seconds = minutes * 60
        self.last = time.monotonic()

    def due(self):
        if self.seconds <= 0 or time.monotonic() - self.last < self.seconds:
            return False
        self.last = time.monotonic()
        return True


@contextlib.contextmanager
def rng_untouched(device):
    """A context that restores the global torch RNG (CPU, and the accelerator in use) on exit.

    Evaluation samples z from the same generator as training; inside this context it leaves the training
    stream where it was, so an evaluation after a mid-epoch stop (--max-steps) cannot make the resumed run
    diverge from an uninterrupted one, and evaluating more or less never changes what training does.
    """
    cpu, accelerator = torch.get_rng_state(), device_rng_state(device)
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        set_device_rng_state(device, accelerator)


def purge_scalar_curves(writer, main_tag, names, purge_step):
    """Make TensorBoard drop the `add_scalars(main_tag, ...)` points at or after purge_step from earlier sessions.

    SummaryWriter(purge_step=...) writes that marker into the main run only, but add_scalars gives every curve
    a sub-run of its own (LOG_DIR/RUN/<main_tag>_<name>/). A run that crashed after its last checkpoint had
    already logged the steps the resumed run repeats; without the marker each of those would appear twice.
    """
    from tensorboard.compat.proto.event_pb2 import Event, SessionLog
    from torch.utils.tensorboard.writer import FileWriter

    log_dir = writer._get_file_writer().get_logdir()
    for name in names:
        # The sub-run's folder exactly as SummaryWriter.add_scalars names it, so later points go to this writer.
        folder = log_dir + "/" + main_tag.replace("/", "_") + "_" + name
        if folder not in writer.all_writers:
            writer.all_writers[folder] = FileWriter(folder, writer.max_queue, writer.flush_secs,
                                                    writer.filename_suffix)
        writer.all_writers[folder].add_event(Event(step=purge_step, session_log=SessionLog(status=SessionLog.START)))
