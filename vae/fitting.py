"""What every fit in the project shares: the learning-rate schedule, the moving average of the weights, and the
loop that fits a small network (the learned samplers of vae/samplers.py and vae/diffusion_prior.py). The VAE's
own optimisation (vae/training.py) uses the same schedule and average.

    network, loss = fit_network(lambda: Net(), lambda net: net.loss(next_batch()), steps=2000, lr=1e-3)
"""

import math
from collections import deque

import torch
from tqdm import tqdm

LOSS_WINDOW = 200  # the loss a fit reports is the mean of its last steps: one batch's loss is noise


def learning_rate_schedule(optimizer, warmup_steps, total_steps, cosine=True):
    """The learning rate as a factor of the optimizer's, per step: a linear warm-up over warmup_steps, then
    constant, or a cosine decay that reaches 0 at total_steps (Loshchilov & Hutter 2017)."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if cosine:
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))))
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


def fit_network(make_network, loss, steps, lr, seed=0, device="cpu", warmup_steps=0, ema_decay=0.0,
                description="fitting", progress=False):
    """Fit the network that make_network() builds by minimising loss(network), a scalar tensor that draws its own
    batch, for `steps` Adam steps under learning_rate_schedule (warm-up, then cosine to 0).

    The network is built and trained under torch's seeded global RNG, forked so that the caller's streams (a
    training run's, say) continue as if nothing had been drawn. Returns (the network in eval mode, or its moving
    average with ema_decay > 0; the mean loss over the last LOSS_WINDOW steps)."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        network = make_network().to(device)
        average = make_ema(network, ema_decay)
        optimizer = torch.optim.Adam(network.parameters(), lr=lr)
        schedule = learning_rate_schedule(optimizer, warmup_steps, steps)
        recent = deque(maxlen=LOSS_WINDOW)
        for _ in tqdm(range(steps), desc=description, unit="step", disable=not progress):
            value = loss(network)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            schedule.step()
            if average is not None:
                average.update_parameters(network)
            recent.append(value.item())
    kept = average.module if average is not None else network
    return kept.eval(), sum(recent) / max(1, len(recent))
