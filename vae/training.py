"""The training core: the optimizer and schedules, one training epoch, and the one evaluation that both
`vae_training.py` (every epoch) and `vae_inference.py evaluate` run.

    optimization = Optimization(model, config, steps_per_epoch=len(batches))
    state = TrainState()
    losses = train_one_epoch(model, batches, loss_fn, optimization, state)
    metrics = evaluate(model, eval_batches, beta=config.beta)
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
from vae.device import model_device, sum_dtype
from vae.errors import Stopped, TrainingDiverged, UserError
from vae.layers import architecture
from vae.losses import ELBOLoss, kl_per_dimension
from vae.metrics import active_units, bits_per_dim, iwae_log_likelihood, psnr_db
from vae.schedules import KLSchedule
from vae.vae import eval_mode

# Decoded images held in memory at once while importance sampling: bounds memory for any K and resolution
# (4096 images of 64x64 are 200 MB in float32, about 1 GB with the float64 likelihood terms).
DECODE_CHUNK_IMAGES = 1024


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
    """The learning rate as a factor of --lr per step: a linear warm-up over --lr-warmup-epochs, then constant
    or a cosine decay that reaches 0 at the last step of --epochs (Loshchilov & Hutter 2017)."""
    warmup = round(config.lr_warmup_epochs * steps_per_epoch)
    total = config.epochs * steps_per_epoch

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        if config.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
        return 1.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_ema(model, decay):
    """An exponential moving average of the weights (and buffers), or None for decay 0: after update n,
    avg = d * avg + (1 - d) * weights with d = min(decay, (1 + n) / (10 + n)). The warm-up of d (as TensorFlow's
    ExponentialMovingAverage does with num_updates) keeps the random initial weights from lingering in the
    average: with a fixed 0.999 they would still weigh 4.5% after 3,100 steps. Its .module is a plain model."""
    if not decay:
        return None

    def update(averaged, weights, num_averaged):
        # A tensor on the model's device: reading the count as a Python number would wait for the GPU.
        rate = 1 - ((1 + num_averaged) / (10 + num_averaged)).clamp(max=decay)
        for average, weight in zip(averaged, weights):
            if average.is_floating_point():
                average.lerp_(weight, rate.to(average.dtype))
            else:  # counters, such as BatchNorm's num_batches_tracked, are copied: an average of counts is none
                average.copy_(weight)
    return torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=update, use_buffers=True)


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
    where its 3x3 convolutions run faster in it; float32 on a CPU ran at the same speed either way (119 and 117
    img/s), and the tutorial's small model stays contiguous."""
    faster = architecture(config.arch).channels_last and (device.type == "cuda" or amp_in_effect(config, device))
    return torch.channels_last if faster else torch.contiguous_format


def native_bf16():
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX); without it bf16 is emulated."""
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


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

def _log_normal(z):
    """log N(z; 0, I) summed over every dimension but the first two (K, B) (nats)."""
    return -0.5 * (z.pow(2) + math.log(2 * math.pi)).flatten(2).sum(dim=2)


def importance_samples(model, x, mean, log_var, iw_samples, generator=None, discretized=False):
    """K = iw_samples draws z_k = mean + std * noise_k per image: a dict of tensors in nats: "trained_term" (B,)
    the reconstruction term training minimises, for the first draw only, and (K, B) in float64
    "log_likelihood" log p(x|z_k) under the model's likelihood (a density for the Gaussians),
    "log_weight" log p(x|z_k) + log p(z_k) - log q(z_k|x), and with discretized=True the same two under the
    likelihood of the 8-bit pixels ("log_likelihood_8bit", "log_weight_8bit"), from the same decoded images.
    The noise is drawn from `generator` and decoded DECODE_CHUNK_IMAGES images at a time, so the memory needed
    does not grow with K, at any resolution.
    """
    std = log_var.mul(0.5).exp()
    names = ["log_likelihood", "log_weight"] + (["log_likelihood_8bit", "log_weight_8bit"] if discretized else [])
    # Filled chunk by chunk: allocated once, before the decoded images, so that no small result stays between the
    # large freed blocks of each chunk (glibc's heap would keep them, and grow by gigabytes over many chunks).
    results = {name: torch.empty(iw_samples, len(x), dtype=torch.float64) for name in names}
    per_chunk = max(1, DECODE_CHUNK_IMAGES // len(x))
    for start in range(0, iw_samples, per_chunk):
        k = min(per_chunk, iw_samples - start)
        eps = torch.randn(k, *mean.shape, generator=generator).to(mean.device)
        z = mean + std * eps
        parameters = model.decode_parameters(z.flatten(0, 1))
        targets = x.repeat(k, *[1] * (x.dim() - 1))
        # In float64 on the CPU: log-weights of thousands of nats keep their small differences, and MPS has none.
        log_prior = _log_normal(z).cpu().double()
        # log q(z|x) from the noise itself: z - mean would cancel digits when std is far below |mean|.
        log_posterior = (_log_normal(eps) - log_var.mul(0.5).flatten(1).sum(dim=1)).cpu().double()
        log_likelihood, log_likelihood_8bit = model.likelihood.log_likelihoods(targets, parameters, discretized)
        if start == 0:  # the trained term of the first draw only: all the training objective needs
            # Computed for the chunk's draws and cut after: only the likelihood may index its parameters.
            trained_term = model.likelihood.loss(targets, parameters)[:len(x)]
        for suffix, values in [("", log_likelihood)] + ([("_8bit", log_likelihood_8bit)] if discretized else []):
            values = values.view(k, len(x)).cpu().double()
            results["log_likelihood" + suffix][start:start + k] = values
            results["log_weight" + suffix][start:start + k] = values + log_prior - log_posterior
    return {"trained_term": trained_term, **results}


def image_measures(model, x, iw_samples, generator, beta, discretized):
    """What evaluate() measures on each image: a dict of per-image values, (B,) or (B, latent size), in nats
    unless a name says otherwise. evaluate() reports the mean of each over the evaluation images under the same
    name, and keeps the sums of squares for standard errors and variances: a new measurement is one entry here.
    """
    mean, log_var = model.encode(x)
    samples = importance_samples(model, x, mean, log_var, iw_samples, generator, discretized)
    kl = kl_per_dimension(mean, log_var).flatten(1)
    measures = {
        "kl_nats": kl.sum(dim=1),
        # -log p(x|z) under the model's likelihood, averaged over the K draws z ~ q(z|x).
        "reconstruction_nats": -samples["log_likelihood"].mean(dim=0),
        "iwae_nll_nats": -iwae_log_likelihood(samples["log_weight"]),
        # Of the reconstruction decoded from the posterior mean, for the PSNR.
        "mean_squared_error": (model.decode(mean) - x).pow(2).flatten(1).mean(dim=1),
        "posterior_std": log_var.mul(0.5).exp().flatten(1).mean(dim=1),
        "kl_per_dim": kl,
        "posterior_mean": mean.flatten(1),  # per dimension; its variance over images counts the active units
    }
    if beta is not None:  # the training objective on these images (the trained term of the first draw, no free bits)
        measures["loss"] = beta * measures["kl_nats"] + samples["trained_term"]
    if discretized:
        measures["reconstruction_8bit_nats"] = -samples["log_likelihood_8bit"].mean(dim=0)
        measures["iwae_nll_8bit_nats"] = -iwae_log_likelihood(samples["log_weight_8bit"])
    return measures


class Sums:
    """Per-measure sums and sums of squares over images, kept on the device (in `dtype`) and reduced across
    processes."""

    def __init__(self, dtype, device):
        self.dtype, self.device = dtype, device
        self.count, self.sums, self.squares = 0, {}, {}

    def add(self, measures):
        for name, values in measures.items():
            values = values.to(device=self.device, dtype=self.dtype)
            self.sums[name] = self.sums.get(name, 0) + values.sum(dim=0)
            self.squares[name] = self.squares.get(name, 0) + values.pow(2).sum(dim=0)
        self.count += len(next(iter(measures.values())))

    def reduce(self):
        """Every process's sums added up (in one call, the names in a fixed order): (count, means, standard errors
        of the mean, sample variances), each a dict of float64 CPU tensors by measure name."""
        names = sorted(self.sums)
        tensors = [self.sums[name] for name in names] + [self.squares[name] for name in names]
        flat = torch.cat([torch.tensor([float(self.count)], dtype=self.dtype, device=self.device),
                          *(tensor.reshape(-1) for tensor in tensors)])
        flat = distributed.all_reduce_sum(flat).double().cpu()
        count = int(flat[0])
        parts = [part.view(tensor.shape) for part, tensor in zip(flat[1:].split([t.numel() for t in tensors]), tensors)]
        totals, squares = dict(zip(names, parts[:len(names)])), dict(zip(names, parts[len(names):]))
        if count == 0:
            return 0, {}, {}, {}
        means = {name: total / count for name, total in totals.items()}
        variances = {name: (squares[name] - totals[name].pow(2) / count).clamp(min=0) / max(count - 1, 1)
                     for name in names}
        errors = {name: (variance / count).sqrt() if count > 1 else torch.zeros_like(variance)
                  for name, variance in variances.items()}
        return count, means, errors, variances


@torch.no_grad()
def evaluate(model, batches, beta=None, iw_samples=1, generator=None, progress=False):
    """Held-out measurements under model.eval() and no_grad, per image; nats unless a name says otherwise.

    batches: an ImageBatches over the evaluation images (in order, not shuffled). beta = 1 throughout:
    neg_elbo_nats = kl_nats + reconstruction_nats (-log p(x|z) under the model's likelihood, averaged over the
    iw_samples draws z ~ q(z|x)); iwae_nll_nats is the importance-weighted bound with K = iw_samples (the
    single-sample ELBO for K = 1); bits_per_dim scores the 8-bit pixels (discretized likelihood, IWAE bound).
    psnr_db compares reconstructions decoded from the posterior mean; active_units, kl_per_dim and
    posterior_std diagnose posterior collapse. With beta, loss = beta * KL + the trained reconstruction term
    (no free bits), the training objective on these images. Noise comes from `generator` (a fixed seed makes
    the numbers reproducible; None: torch's global generator). Under torchrun each process evaluates its
    shard and the sums are reduced. The per-image measurements are `image_measures`.
    """
    model = unwrap(model)
    device = model_device(model)
    likelihood = model.likelihood
    discretized = likelihood.no_bits_per_dim is None
    sums = Sums(sum_dtype(device), device)
    with eval_mode(model):
        for x in tqdm(batches.epoch(0), total=len(batches), desc=f"evaluating (K={iw_samples})", unit="batch",
                      leave=False, disable=not progress):
            sums.add(image_measures(model, x, iw_samples, generator, beta, discretized))
    count, mean, error, variance = sums.reduce()
    if count == 0:
        raise UserError("the evaluation set is empty; use a larger --holdout or --eval-size, or --eval-split none")
    num_dims = batches.images[0].numel()
    scalar = {name: value.item() for name, value in mean.items() if value.dim() == 0}
    metrics = {
        "num_images": count, "likelihood": likelihood.name, "decoder_sigma": likelihood.shared_sigma(),
        "iw_samples": iw_samples, "latent_size": model.latent_size,
        # Every measurement's mean, under its own name: per-dimension ones as lists.
        **{name: scalar[name] if name in scalar else value.tolist() for name, value in mean.items()},
        "neg_elbo_nats": scalar["kl_nats"] + scalar["reconstruction_nats"],
        "iwae_nll_stderr": error["iwae_nll_nats"].item(),
        "psnr_db": psnr_db(scalar["mean_squared_error"]),
        "active_units": active_units(variance["posterior_mean"]),
        "posterior_mean_variance": variance["posterior_mean"].tolist(),
    }
    if discretized:
        metrics.update({
            "bits_per_dim": bits_per_dim(scalar["iwae_nll_8bit_nats"], num_dims),
            "bits_per_dim_stderr": bits_per_dim(error["iwae_nll_8bit_nats"].item(), num_dims),
            "neg_elbo_bits_per_dim": bits_per_dim(scalar["kl_nats"] + scalar["reconstruction_8bit_nats"], num_dims),
            "bits_per_dim_note": f"IWAE bound with K={iw_samples} under the decoder's "
                                 f"{likelihood.discretized} discretized to 256 "
                                 f"levels (bins of width 1/255, end bins to +-inf); D = {num_dims}; "
                                 f"neg_elbo_bits_per_dim is the ELBO under the same discretized likelihood",
        })
    else:
        metrics.update({
            "bits_per_dim": None, "bits_per_dim_stderr": None, "neg_elbo_bits_per_dim": None,
            "bits_per_dim_note": likelihood.no_bits_per_dim.format(name=likelihood.name)})
    return metrics
