"""The training core: the optimizer and schedules, one training epoch, and the one evaluation that both
`vae_training.py` (every epoch) and `vae_inference.py evaluate` run.

    optimizer = make_optimizer(model, config)
    kl_schedule = make_kl_schedule(config, steps_per_epoch)
    lr_schedule = make_lr_schedule(config, optimizer, steps_per_epoch)
    losses = train_one_epoch(model, batches, loss_fn, optimizer, epoch, state, kl_schedule, lr_schedule)
    metrics = evaluate(model, eval_batches, beta=config.beta)
"""

import math
import signal
import time

import torch
from tqdm import tqdm

from vae import distributed
from vae.checkpoint import unwrap
from vae.device import model_device, sum_dtype
from vae.errors import TrainingDiverged, UserError
from vae.losses import kl_per_dimension, reconstruction_loss, reconstruction_nll
from vae.metrics import active_units, bits_per_dim, discretized_log_likelihood, iwae_log_likelihood, psnr_db
from vae.schedules import KLSchedule
from vae.vae import eval_mode

# Decoded images held in memory at once while importance sampling: bounds memory for any K and resolution
# (4096 images of 64x64 are 200 MB in float32, about 1 GB with the float64 likelihood terms).
DECODE_CHUNK_IMAGES = 4096


# -------------------------------------------------------------------------------- optimizer and schedules

def make_optimizer(model, config):
    """Adam at --lr, except the learned decoder log sigma, a single scalar, at --sigma-lr: Adam moves a
    parameter by about its learning rate per step, so at --lr it would need thousands of steps to move."""
    sigma = [p for name, p in model.named_parameters() if name == "raw_log_sigma"]
    others = [p for name, p in model.named_parameters() if name != "raw_log_sigma"]
    groups = [{"params": others}] + ([{"params": sigma, "lr": config.sigma_lr}] if sigma else [])
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


def memory_format(config, device):
    """channels_last for the residual model on CUDA and under bf16 autocast, where its 3x3 convolutions run
    faster in it; float32 on a CPU ran at the same speed either way (119 and 117 img/s), and the seed's small
    model stays contiguous."""
    faster = config.arch == "resnet" and (device.type == "cuda" or (config.amp and device.type == "cpu"))
    return torch.channels_last if faster else torch.contiguous_format


def check_amp(device):
    """bf16 autocast needs CUDA or a CPU; on a CPU without native bf16 (AVX512-BF16 or AMX) it still works,
    emulated, and is usually slower than float32: say so."""
    if device.type not in ("cuda", "cpu"):
        raise UserError(f"--amp (bf16 autocast) runs on CUDA and CPUs, not {device.type}; drop --amp")
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or \
        getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    if device.type == "cpu" and not native:
        print("note: this CPU has no native bf16 (AVX512-BF16 or AMX): --amp is emulated and likely slower than "
              "float32 here")


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


def train_one_epoch(model, batches, loss_fn, optimizer, epoch, state, kl_schedule=None, lr_schedule=None, ema=None,
                    grad_clip=0.0, writer=None, stop=None, after_step=None, max_steps=0, amp=False,
                    input_format=torch.contiguous_format, show_progress=True):
    """One pass over the training batches, starting at state["batch"] (non-zero when resumed mid-epoch).

    Per step: the KL weight from kl_schedule, the loss, the gradients (their global norm clipped to grad_clip
    when > 0), the optimizer and lr_schedule steps, and the EMA update. Updates state["step"] and
    state["batch"] and calls after_step(); returns the last step's losses (the seed's names) and the epoch's
    mean gradient norm (before clipping). Stops early, leaving state["batch"] where it stopped, when `stop` is
    requested on any process or max_steps is reached. amp runs the model under bf16 autocast; the loss is
    always computed in float32.
    """
    model.train()
    progress = tqdm(batches.epoch(epoch, start_batch=state["batch"]), total=len(batches), initial=state["batch"],
                    desc=f"epoch {epoch + 1}", leave=False, mininterval=1.0, dynamic_ncols=True,
                    disable=not show_progress)
    losses, grad_norms = {}, []
    for x in progress:
        if kl_schedule is not None:
            loss_fn.beta = kl_schedule(state["step"])
        x = x.contiguous(memory_format=input_format)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            reconstruction, mean, log_var, log_scale = model(x, return_log_scale=True)
        _, kl, reconstruction, total = loss_fn(x, reconstruction.float(), mean.float(), log_var.float(),
                                               log_sigma=None if log_scale is None else log_scale.float())
        if distributed.any_process(not torch.isfinite(total), x.device):  # every process stops at the same step
            raise TrainingDiverged(f"the loss became {total.item()} at step {state['step'] + 1} (epoch {epoch + 1})")
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if grad_clip > 0:
            grad_norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
        else:
            grad_norms.append(torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]))
        optimizer.step()
        if lr_schedule is not None:
            lr_schedule.step()
        if ema is not None:
            ema.update_parameters(unwrap(model))
        state["step"] += 1
        state["batch"] += 1
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
            writer.add_scalars("loss", losses, state["step"])
        progress.set_postfix(rec=f"{losses['Reconstruction Loss']:.1f}", kl=f"{losses['KL Loss']:.2f}",
                             total=f"{losses['Total Loss']:.1f}", refresh=False)
        if stopping > 0 or (max_steps and state["step"] >= max_steps):
            break
        if after_step is not None:
            after_step()
    progress.close()
    losses["grad_norm"] = torch.stack(grad_norms).mean().item() if grad_norms else math.nan
    return losses


# --------------------------------------------------------------------------------------------- evaluation

def _log_normal(z):
    """log N(z; 0, I) summed over every dimension but the first two (K, B) (nats)."""
    return -0.5 * (z.pow(2) + math.log(2 * math.pi)).flatten(2).sum(dim=2)


def importance_samples(model, x, mean, log_var, noise, discretized=False):
    """Per importance sample z_k = mean + std * noise_k (noise: (K, B, *latent)): a dict of (K, B) tensors in
    nats: "trained_term" (B,) the reconstruction term training minimises, for the first draw only, and in float64
    "log_likelihood" log p(x|z_k) under the model's likelihood (a density for the Gaussians),
    "log_weight" log p(x|z_k) + log p(z_k) - log q(z_k|x), and with discretized=True the same two under the
    likelihood of the 8-bit pixels ("log_likelihood_8bit", "log_weight_8bit"), from the same decoded images.
    Decodes at most DECODE_CHUNK_IMAGES images at once, so K may be large at any resolution.
    """
    std = log_var.mul(0.5).exp()
    chunks = []
    per_chunk = max(1, DECODE_CHUNK_IMAGES // len(x))
    for start in range(0, len(noise), per_chunk):
        eps = noise[start:start + per_chunk]
        k = len(eps)
        z = mean + std * eps
        decoded, log_scale = model.decode_distribution(z.flatten(0, 1))
        targets = x.repeat(k, *[1] * (x.dim() - 1))
        # In float64 on the CPU: log-weights of thousands of nats keep their small differences, and MPS has none.
        log_prior = _log_normal(z).cpu().double()
        # log q(z|x) from the noise itself: z - mean would cancel digits when std is far below |mean|.
        log_posterior = (_log_normal(eps) - log_var.mul(0.5).flatten(1).sum(dim=1)).cpu().double()
        log_likelihood_8bit = (discretized_log_likelihood(targets, decoded, log_scale, model.likelihood)
                               if discretized else None)
        # The logistic's likelihood is the 8-bit one: computed once (in float64), not twice.
        likelihoods = {"": log_likelihood_8bit if model.likelihood == "logistic" else
                       -reconstruction_nll(targets, decoded, model.likelihood, log_scale)}
        if discretized:
            likelihoods["_8bit"] = log_likelihood_8bit
        chunk = {}
        if start == 0:  # the trained term of the first draw only: all the training objective needs
            first_scale = log_scale if log_scale is None or log_scale.dim() == 0 else log_scale[:len(x)]
            trained_term = reconstruction_loss(x, decoded[:len(x)], model.likelihood, first_scale)
        for suffix, log_likelihood in likelihoods.items():
            log_likelihood = log_likelihood.view(k, len(x)).cpu().double()
            chunk["log_likelihood" + suffix] = log_likelihood
            chunk["log_weight" + suffix] = log_likelihood + log_prior - log_posterior
        chunks.append(chunk)
    return {"trained_term": trained_term, **{name: torch.cat([chunk[name] for chunk in chunks]) for name in chunks[0]}}


# The sums evaluate() accumulates per image, reduced across processes in one call.
_SUMS = ("count", "kl", "reconstruction", "loss_reconstruction", "iwae_nll", "iwae_nll_sq", "reconstruction_8bit",
         "iwae_nll_8bit", "iwae_nll_8bit_sq", "squared_error", "posterior_std")


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
    shard and the sums are reduced.
    """
    model = unwrap(model)
    device = model_device(model)
    dtype = sum_dtype(device)
    discretized = model.likelihood != "bernoulli"
    log_sigma = model.log_sigma()
    sums = torch.zeros(len(_SUMS), dtype=torch.float64)
    # Per latent dimension: summed KL and the first two moments of the posterior means (for their variance).
    moments = torch.zeros(3, model.latent_size, dtype=dtype, device=device)
    with eval_mode(model):
        for x in tqdm(batches.epoch(0), total=len(batches), desc=f"evaluating (K={iw_samples})", unit="batch",
                      leave=False, disable=not progress):
            mean, log_var = model.encode(x)
            kl = kl_per_dimension(mean, log_var)
            noise = torch.randn(iw_samples, *mean.shape, generator=generator).to(device)
            samples = importance_samples(model, x, mean, log_var, noise, discretized)
            nll = -iwae_log_likelihood(samples["log_weight"])
            batch_sums = {
                "count": len(x), "kl": kl.sum(), "reconstruction": -samples["log_likelihood"].mean(dim=0).sum(),
                # The trained reconstruction term (SSE for the seed) of the first draw: the training objective.
                "loss_reconstruction": samples["trained_term"].sum(),
                "iwae_nll": nll.sum(), "iwae_nll_sq": nll.pow(2).sum(),
                "squared_error": (model.decode(mean) - x).pow(2).sum(),
                "posterior_std": log_var.mul(0.5).exp().flatten(1).mean(dim=1).sum(),
            }
            if discretized:
                nll_8bit = -iwae_log_likelihood(samples["log_weight_8bit"])
                batch_sums.update(reconstruction_8bit=-samples["log_likelihood_8bit"].mean(dim=0).sum(),
                                  iwae_nll_8bit=nll_8bit.sum(), iwae_nll_8bit_sq=nll_8bit.pow(2).sum())
            sums += torch.tensor([float(batch_sums.get(name, 0.0)) for name in _SUMS], dtype=torch.float64)
            kl = kl.to(dtype)
            moments += torch.stack([kl.sum(dim=0), mean.flatten(1).to(dtype).sum(dim=0),
                                    mean.flatten(1).to(dtype).pow(2).sum(dim=0)])
    sums = distributed.all_reduce_sum(sums.to(device=device, dtype=dtype)).double().cpu()
    distributed.all_reduce_sum(moments)
    totals = dict(zip(_SUMS, sums.tolist()))
    count = totals["count"]
    if count == 0:
        raise UserError("the evaluation set is empty; use a larger --holdout or --eval-size, or --eval-split none")
    num_dims = batches.images[0].numel()
    kl_sum, mean_sum, mean_square_sum = moments.double().cpu()
    variance = (mean_square_sum - mean_sum.pow(2) / count) / max(count - 1, 1)
    metrics = {
        "num_images": int(count),
        "likelihood": model.likelihood,
        "decoder_sigma": None if log_sigma is None else log_sigma.exp().item(),
        "neg_elbo_nats": (totals["kl"] + totals["reconstruction"]) / count,
        "kl_nats": totals["kl"] / count,
        "reconstruction_nats": totals["reconstruction"] / count,
        "iw_samples": iw_samples,
        "iwae_nll_nats": totals["iwae_nll"] / count,
        "iwae_nll_stderr": _standard_error(totals["iwae_nll"], totals["iwae_nll_sq"], count),
        "psnr_db": psnr_db(totals["squared_error"] / (count * num_dims)),
        "active_units": active_units(variance),
        "latent_size": model.latent_size,
        "posterior_std": totals["posterior_std"] / count,
        "kl_per_dim": (kl_sum / count).tolist(),
        "posterior_mean_variance": variance.tolist(),
    }
    if beta is not None:
        metrics["loss"] = (beta * totals["kl"] + totals["loss_reconstruction"]) / count
    if discretized:
        metrics.update({
            "bits_per_dim": bits_per_dim(totals["iwae_nll_8bit"] / count, num_dims),
            "bits_per_dim_stderr": bits_per_dim(
                _standard_error(totals["iwae_nll_8bit"], totals["iwae_nll_8bit_sq"], count), num_dims),
            "neg_elbo_bits_per_dim": bits_per_dim((totals["kl"] + totals["reconstruction_8bit"]) / count, num_dims),
            "bits_per_dim_note": f"IWAE bound with K={iw_samples} under the decoder's "
                                 f"{'logistic' if model.likelihood == 'logistic' else 'Gaussian'} discretized to 256 "
                                 f"levels (bins of width 1/255, end bins to +-inf); D = {num_dims}; "
                                 f"neg_elbo_bits_per_dim is the ELBO under the same discretized likelihood",
        })
    else:
        metrics.update({
            "bits_per_dim": None, "bits_per_dim_stderr": None, "neg_elbo_bits_per_dim": None,
            "bits_per_dim_note": f"the {model.likelihood} likelihood is not a normalized distribution over 8-bit "
                                 f"pixels (binary cross-entropy on non-binary data), so it has no bits/dim"})
    return metrics


def _standard_error(total, total_of_squares, count):
    """Standard error of the mean of per-image values, from their sum and sum of squares (0 for one value)."""
    if count < 2:
        return 0.0
    variance = max(total_of_squares - total ** 2 / count, 0.0) / (count - 1)
    return math.sqrt(variance / count)
