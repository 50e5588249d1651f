"""The training core: the optimizer and schedules, the training step and one training epoch. (The evaluation that
training runs every epoch, and inference on demand, is vae/evaluation.py.)

    optimization = Optimization(model, config, steps_per_epoch=len(batches))
    state = TrainState()
    losses = train_one_epoch(model, batches, loss_fn, optimization, state)
"""

import contextlib
import copy
import dataclasses
import math
import signal
import time

import torch
from tqdm import tqdm

from vae import distributed
from vae.checkpoint import unwrap
from vae.device import model_device, native_bf16
from vae.errors import Stopped, TrainingDiverged, UserError
from vae.fitting import learning_rate_schedule, make_ema  # noqa: F401 (make_ema: part of this API)
from vae.layers import architecture
from vae.losses import ELBOLoss
from vae.schedules import KLSchedule


# -------------------------------------------------------------------------------- optimizer and schedules

def make_optimizer(model, config):
    """Adam at --lr, except the likelihood's own parameters (a learned log sigma, a single scalar) at --sigma-lr:
    Adam moves a parameter by about its learning rate per step, so at --lr it would need thousands of steps."""
    own = list(model.likelihood.parameters())
    others = [p for p in model.parameters() if all(p is not q for q in own)]
    groups = [{"params": others}] + ([{"params": own, "lr": config.sigma_lr}] if own else [])
    return torch.optim.Adam(groups, lr=config.lr)


def make_kl_schedule(config, steps_per_epoch):
    """The KL weight schedule, with its lengths in optimisation steps. The run's length in epochs sets the
    cycles; --max-steps only cuts a run short, it does not rescale the schedule."""
    return KLSchedule(config.kl_schedule, config.beta, warmup_steps=round(config.kl_warmup_epochs * steps_per_epoch),
                      total_steps=config.epochs * steps_per_epoch, cycles=config.kl_cycles, ratio=config.kl_ratio)


def make_lr_schedule(config, optimizer, steps_per_epoch):
    """The learning rate as a factor of --lr per step (vae.fitting.learning_rate_schedule): a linear warm-up over
    --lr-warmup-epochs, then constant or a cosine decay that reaches 0 at the last step of --epochs."""
    return learning_rate_schedule(optimizer, round(config.lr_warmup_epochs * steps_per_epoch),
                                  config.epochs * steps_per_epoch, cosine=config.lr_schedule == "cosine")


class Optimization:
    """Everything that turns a loss into a weight update, built from a TrainConfig: the optimizer, the learning-rate
    and KL schedules, the EMA of the weights (None without --ema), the gradient clip, bf16 autocast and the memory
    format of the inputs. The KL weight is a function of the step and the config, so only the optimizer, the
    learning-rate schedule and the EMA are state (state_dict, load_state_dict)."""

    def __init__(self, model, config, steps_per_epoch):
        self.config = config
        self.optimizer = make_optimizer(model, config)
        self.lr_schedule = make_lr_schedule(config, self.optimizer, steps_per_epoch)
        self.kl_schedule = make_kl_schedule(config, steps_per_epoch)
        self.ema = make_ema(model, config.ema)
        self.grad_clip = config.grad_clip
        self.amp = amp_in_effect(config, model_device(model))
        self.input_format = memory_format(config, model_device(model))

    def step(self, model, total):
        """Backward pass and update for the loss `total`; returns the global gradient norm before clipping."""
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if self.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        self.optimizer.step()
        self.lr_schedule.step()
        if self.ema is not None:
            self.ema.update_parameters(unwrap(model))
        return grad_norm

    def state_dict(self):
        """The checkpoint's optimizer and (learning-rate) schedule entries, and ema_model with --ema."""
        state = {"optimizer": self.optimizer.state_dict(), "schedule": self.lr_schedule.state_dict()}
        if self.ema is not None:
            state["ema_model"] = self.ema.module.state_dict()
        return state

    def load_state_dict(self, checkpoint, path, load_model):
        """Restore from a checkpoint dict (load_model(module, checkpoint, path, key) loads a model's weights)."""
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        # Format 1 kept the learning-rate schedule as lr_schedule, and the KL schedule as schedule.
        schedule = checkpoint.get("lr_schedule", checkpoint["schedule"])
        if "last_epoch" in schedule:
            self.lr_schedule.load_state_dict(schedule)
        if self.ema is not None:
            load_model(self.ema.module, checkpoint, path, key="ema_model")
            self.ema.n_averaged.fill_(checkpoint["step"])  # one update per step: the warm-up resumes where it was


def memory_format(config, device):
    """channels_last for an architecture that asks for it (the residual model) on CUDA and under bf16 autocast,
    where its 3x3 convolutions run faster in it; float32 on a CPU ran at the same speed either way
    (docs/throughput.md), and the tutorial's small model stays contiguous."""
    faster = architecture(config.arch).channels_last and (device.type == "cuda" or amp_in_effect(config, device))
    return torch.channels_last if faster else torch.contiguous_format


def amp_in_effect(config, device):
    """Whether --amp runs bf16 autocast here: on CUDA and on CPUs with native bf16. On a CPU without it, bf16 is
    emulated and trained about 10x slower than float32 on this project's machine, so the run stays in float32
    (--amp only changes speed, so the recipes that set it stay usable everywhere)."""
    return config.amp and (device.type == "cuda" or (device.type == "cpu" and native_bf16()))


def check_amp(device):
    """bf16 autocast needs CUDA or a CPU: a one-line error elsewhere; on a CPU without native bf16 say that the run
    stays in float32."""
    if device.type not in ("cuda", "cpu"):
        raise UserError(f"--amp (bf16 autocast) runs on CUDA and CPUs, not {device.type}; drop --amp")
    if device.type == "cpu" and not native_bf16():
        print("note: this CPU has no native bf16 (AVX512-BF16 or AMX), where bf16 autocast is emulated and far "
              "slower: --amp is off for this run, which trains in float32")


def step_loss(model, x, loss_fn, amp=False):
    """One training step's forward pass and loss: (kl, reconstruction, total) of loss_fn. The model runs under bf16
    autocast with amp; the loss is always computed in float32."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        parameters, mean, log_var = model(x, return_parameters=True)
    # The likelihood makes its parameters in float32 itself (Likelihood.forward).
    _, kl, reconstruction, total = loss_fn(x, parameters, mean.float(), log_var.float())
    return kl, reconstruction, total


def training_step_probe(model, x, config):
    """A function that runs one training step's forward and backward pass on a copy of the model, for timing the
    thread counts: the model, its optimizer and torch's random stream are left exactly as they were."""
    probe = copy.deepcopy(unwrap(model)).train()
    loss_fn = ELBOLoss(config.beta, probe.likelihood, config.free_bits)
    amp = amp_in_effect(config, x.device)

    def work():
        with torch.random.fork_rng(devices=[]):
            total = step_loss(probe, x, loss_fn, amp)[2]
        probe.zero_grad(set_to_none=True)
        total.backward()
    return work


# ----------------------------------------------------------------------------------------------- training

def every(minutes, action):
    """A callable that runs action() when `minutes` have passed since it last did (never for minutes <= 0)."""
    last = time.monotonic()

    def maybe():
        nonlocal last
        if minutes > 0 and time.monotonic() - last >= 60 * minutes:
            action()
            last = time.monotonic()
    return maybe


@dataclasses.dataclass
class TrainState:
    """Where a run is: what train_one_epoch advances and a checkpoint stores. batch counts the batches of the
    current epoch already trained (non-zero when a run stopped mid-epoch); best_eval is the best held-out -ELBO."""
    epoch: int = 0
    step: int = 0
    batch: int = 0
    best_eval: float = math.inf
    eval: dict = None  # the latest held-out evaluation

    def as_dict(self):
        return dataclasses.asdict(self)


class StopRequest:
    """When to stop early: SIGINT/SIGTERM become a flag the loop checks after each step, so the step finishes and a
    checkpoint is written before the process exits (130 for SIGINT, 143 for SIGTERM, as shells expect); and
    max_steps (0: no limit) ends a run after that many optimisation steps in total."""

    def __init__(self, max_steps=0):
        self.max_steps = max_steps
        self.signal = None
        self._previous = {}
        self._raising = False  # see raising()

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.signal = signum
        if self._raising:
            raise Stopped(f"stopped by signal {signum}")

    @contextlib.contextmanager
    def raising(self):
        """Within it, a signal (or one that came before) raises Stopped at once: for the long steps at the end of a
        run (the samplers' fit, FID), which have no step after which to look at the flag."""
        if self.requested:
            raise Stopped(f"stopped by signal {self.signal}")
        self._raising = True
        try:
            yield
        finally:
            self._raising = False

    @property
    def requested(self):
        return self.signal is not None

    @property
    def exit_code(self):
        return 128 + self.signal

    def at_max_steps(self, step):
        return bool(self.max_steps) and step >= self.max_steps


def train_one_epoch(model, batches, loss_fn, optimization, state, writer=None, stop=None, after_step=None,
                    progress=True):
    """One pass over the training batches, from batch state.batch of epoch state.epoch (non-zero when resumed
    mid-epoch); returns the last step's losses (the tutorial's names) and the epoch's mean gradient norm.

    Per step: the KL weight from the schedule, the loss (the model under bf16 autocast with --amp, the loss in
    float32), optimization.step, state.step and state.batch advanced, the losses to `writer` and after_step().
    Stops early, leaving state.batch where it stopped, when `stop` is requested on any process or its max_steps is
    reached.
    """
    model.train()
    bar = tqdm(batches.epoch(state.epoch, start_batch=state.batch), total=len(batches), initial=state.batch,
               desc=f"epoch {state.epoch + 1}", leave=False, mininterval=1.0, dynamic_ncols=True, disable=not progress)
    losses, grad_norms = {}, []
    with bar:  # closed, and its line cleared, however the epoch ends
        for x in bar:
            loss_fn.beta = optimization.kl_schedule(state.step)
            x = x.contiguous(memory_format=optimization.input_format)
            kl, reconstruction, total = step_loss(model, x, loss_fn, optimization.amp)
            # Every process stops at the same step.
            if distributed.any_process(not torch.isfinite(total), x.device):
                raise TrainingDiverged(f"the loss became {total.item()} at step {state.step + 1} "
                                       f"(epoch {state.epoch + 1})")
            grad_norms.append(optimization.step(model, total))
            state.step += 1
            state.batch += 1
            # One reduction per step serves both: the logged losses are the global batch's, and a stop requested
            # on any process stops all of them after this same step.
            stop_here = float(stop is not None and stop.requested)
            step_sums = torch.stack([kl.detach(), reconstruction.detach(), total.detach(),
                                     torch.tensor(stop_here, device=x.device)])
            kl_sum, reconstruction_sum, total_sum, stopping = distributed.all_reduce_sum(step_sums).tolist()
            world_size = batches.world_size
            losses = {"KL Loss": kl_sum / world_size, "Reconstruction Loss": reconstruction_sum / world_size,
                      "Total Loss": total_sum / world_size}
            if writer is not None:
                writer.add_scalars("loss", losses, state.step)
            bar.set_postfix(rec=f"{losses['Reconstruction Loss']:.1f}", kl=f"{losses['KL Loss']:.2f}",
                            total=f"{losses['Total Loss']:.1f}", refresh=False)
            if stopping > 0 or (stop is not None and stop.at_max_steps(state.step)):
                break
            if after_step is not None:
                after_step()
    losses["grad_norm"] = torch.stack(grad_norms).mean().item() if grad_norms else math.nan
    return losses


# --------------------------------------------------------------------------------------------- evaluation
