"""Pieces of the training script that tests and the notebook import: device choice, validation, signals."""

import signal
import time

import torch

from vae.config import default_channels
from vae.errors import UserError


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
        (config.lr > 0, f"--lr must be > 0, got {config.lr}"),
        (config.batch_size >= 1, f"--batch-size must be at least 1, got {config.batch_size}"),
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
