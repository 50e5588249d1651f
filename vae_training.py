"""Train the original VAE on Flowers102.

    python vae_training.py                        # the seed's run: train split, 32x32, latent 10, beta 0.1
    python vae_training.py --resolution 64 --run-name flowers64
    python vae_training.py --resume auto --run-name flowers64
    tensorboard --logdir runs
"""

import dataclasses
import json
import math
import random
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid
from tqdm import tqdm

from datasets.preprocessing import ImageBatches, cached_images, holdout_split, to_float
from vae.checkpoint import (git_sha, library_versions, load_checkpoint, restore_model, rng_state, save_checkpoint,
                            set_rng_state, unwrap)
from vae import distributed
from vae.config import TrainConfig, build_parser, config_file_arguments, config_from_args
from vae.errors import TrainingDiverged, UserError
from vae.losses import ELBOLoss, kl_per_dimension, reconstruction_loss, reconstruction_nll, sum_squared_error
from vae.metrics import ACTIVE_UNIT_THRESHOLD, psnr_db
from vae.schedules import schedule_for
from vae.training import StopRequest, Timer, gradient_norm, purge_scalar_curves, rng_untouched, validate_config
from vae.vae import build_model

# Flags that may change when a run is resumed; any other difference would silently make it another run.
RESUMABLE_FLAGS = {"epochs", "max_steps", "log_dir", "num_workers", "device", "checkpoint_every", "run_name",
                   "cache_dir", "amp", "compile"}


def parse_args(argv=None):
    """(config, args, names of the config flags given explicitly on the command line)."""
    parser = build_parser(TrainConfig, description="Train the original VAE (Kingma & Welling) on Flowers102.")
    parser.add_argument("--resume", default="", help="continue a run from its checkpoint: a path, or 'auto' "
                        "for LOG_DIR/RUN_NAME/checkpoint.pt (starts afresh when there is none yet)")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    parser.add_argument("--config", default="", help="a JSON file of settings (e.g. recipes/recommended.json); "
                        "flags on the command line override it")
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    # A --config file's settings go first, so the flags after them override them; both count as given.
    argv = config_file_arguments(parser, parser.parse_known_args(argv)[0].config) + argv
    args = parser.parse_args(argv)
    unset = object()
    parser.set_defaults(**{f.name: unset for f in dataclasses.fields(TrainConfig)})
    # --resume and --debug are not settings of the run: only config flags count as given explicitly.
    explicit = {name for name, value in vars(parser.parse_args(argv)).items()
                if value is not unset and name in TrainConfig.__dataclass_fields__}
    config = config_from_args(args)
    if config.likelihood == "gaussian-learned" and "beta" not in explicit:
        config.beta = 1.0  # a learned sigma is calibrated by the ELBO itself, as in sigma-VAE
    return config, args, explicit


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_split(config, split):
    """A split's uint8 images (N, 3, R, R), through the image cache."""
    try:
        return cached_images(config.data_dir, split, config.resolution, config.cache_dir, config.num_workers,
                             config.skip_bad_images)
    except UserError as error:
        if config.skip_bad_images or "cannot read image" not in str(error):
            raise
        raise UserError(f"{error}, or pass --skip-bad-images to leave unreadable images out") from None


def load_data(config):
    """uint8 image tensors (train, eval); eval is None with --eval-split none."""
    images = load_split(config, config.split)
    if config.holdout > 0:
        train_index, eval_index = holdout_split(len(images), config.holdout, config.seed)
        train_images, eval_images = images[train_index], images[eval_index]
    else:
        train_images = images
        eval_images = None if config.eval_split == "none" else load_split(config, config.eval_split)
    if config.batch_size > len(train_images):
        raise UserError(f"--batch-size {config.batch_size} is larger than the {len(train_images)} training images; "
                        f"use --batch-size {len(train_images)} or less")
    if eval_images is not None and config.eval_size:
        eval_images = eval_images[:config.eval_size]
    return train_images, eval_images


def train_one_epoch(model, batches, loss_fn, optimizer, epoch, state, schedule=None, writer=None, stop=None,
                    on_timer=None, max_steps=0, amp=False, show_progress=True):
    """One pass over the training batches, starting at state['batch'] (non-zero when resumed mid-epoch).

    Updates state['step'] and state['batch'] after every step; returns the last step's losses and the mean
    gradient norm. Stops early (state['batch'] then tells where) when `stop` is requested on any process or
    max_steps is reached. amp runs the model under bf16 autocast; the loss is always computed in float32.
    """
    model.train()
    progress = tqdm(batches.epoch(epoch, start_batch=state["batch"]), total=len(batches), initial=state["batch"],
                    desc=f"epoch {epoch + 1}", leave=False, mininterval=1.0, dynamic_ncols=True,
                    disable=not show_progress)
    losses, grad_norms = {}, []
    for x in progress:
        if schedule is not None:
            loss_fn.beta = schedule(state["step"])
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            outputs = model(x)
        _, kl, reconstruction, total = loss_fn(x, *(t.float() for t in outputs), log_sigma=unwrap(model).log_sigma())
        if distributed.any_process(not torch.isfinite(total), x.device):  # every process stops at the same step
            raise TrainingDiverged(f"the loss became {total.item()} at step {state['step'] + 1} (epoch {epoch + 1})")
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        grad_norms.append(gradient_norm(model.parameters()))
        optimizer.step()
        state["step"] += 1
        state["batch"] += 1
        # One reduction per step serves both: the logged losses are the global batch's, and a stop requested
        # on any process stops all of them after this same step.
        stop_here = float(stop is not None and stop.requested)
        step_stats = torch.stack([kl.detach(), reconstruction.detach(), total.detach(),
                                  torch.tensor(stop_here, device=x.device)])
        kl_mean, reconstruction_mean, total_mean, stopping = distributed.all_reduce_sum(step_stats).tolist()
        world_size = batches.world_size
        losses = {"KL Loss": kl_mean / world_size, "Reconstruction Loss": reconstruction_mean / world_size,
                  "Total Loss": total_mean / world_size}
        if writer is not None:
            writer.add_scalars("loss", losses, state["step"])
        progress.set_postfix(rec=f"{losses['Reconstruction Loss']:.1f}", kl=f"{losses['KL Loss']:.2f}",
                             total=f"{losses['Total Loss']:.1f}", refresh=False)
        if stopping > 0 or (max_steps and state["step"] >= max_steps):
            break
        if on_timer is not None:
            on_timer()
    progress.close()
    losses["grad_norm"] = torch.stack(grad_norms).mean().item() if grad_norms else math.nan
    return losses


@torch.no_grad()
def evaluate(model, batches, beta):
    """Held-out measurements under model.eval() and no_grad, averaged per image (nats unless named otherwise).

    kl and reconstruction are the training terms and total = beta * kl + reconstruction (no free bits);
    neg_elbo_nats is the beta = 1 negative ELBO under the model's likelihood (one z per image); psnr_db
    compares reconstructions decoded from the posterior mean; active_units, kl_per_dim and posterior_std
    diagnose posterior collapse. Under torchrun each process evaluates its shard and the sums are reduced.
    """
    was_training = model.training
    model = unwrap(model)
    model.eval()
    log_sigma = model.log_sigma()
    names = ("kl", "reconstruction", "neg_elbo_nats", "squared_error", "posterior_std", "count")
    device = next(model.parameters()).device
    # Sums over a whole split in float64, except on MPS, which has none.
    dtype = torch.float32 if device.type == "mps" else torch.float64
    sums = torch.zeros(len(names), dtype=dtype, device=device)
    # Per latent dimension: summed KL, and the first two moments of the posterior means (for their variance).
    moments = torch.zeros(3, model.latent_size, dtype=dtype, device=device)
    pixels = batches.images[0].numel()
    for x in batches.epoch(0):
        mean, log_var = model.encode(x)
        reconstruction = model.decode(model.sample_latent(mean, log_var))
        kl = kl_per_dimension(mean, log_var)
        sums += torch.stack([
            kl.sum(),
            reconstruction_loss(x, reconstruction, model.likelihood, log_sigma).sum(),
            (reconstruction_nll(x, reconstruction, model.likelihood, log_sigma) + kl.sum(dim=1)).sum(),
            sum_squared_error(x, model.decode(mean)).sum(),
            log_var.mul(0.5).exp().mean(dim=1).sum(),
            torch.tensor(float(len(x)), device=device),
        ]).to(dtype)
        moments += torch.stack([kl.sum(dim=0), mean.sum(dim=0), mean.pow(2).sum(dim=0)]).to(dtype)
    distributed.all_reduce_sum(sums)
    distributed.all_reduce_sum(moments)
    model.train(was_training)
    totals = dict(zip(names, sums.tolist()))
    count = totals.pop("count")
    if count == 0:
        raise UserError("the evaluation set is empty; use a larger --holdout or --eval-size, or --eval-split none")
    metrics = {name: value / count for name, value in totals.items()}
    metrics["total"] = beta * metrics["kl"] + metrics["reconstruction"]
    metrics["psnr_db"] = psnr_db(metrics.pop("squared_error") / pixels)
    kl_sum, mean_sum, mean_square_sum = moments
    variance = (mean_square_sum - mean_sum.pow(2) / count) / max(count - 1, 1)
    metrics["active_units"] = int((variance > ACTIVE_UNIT_THRESHOLD).sum())
    metrics["kl_per_dim"] = (kl_sum / count).tolist()
    metrics["posterior_mean_variance"] = variance.tolist()
    return metrics


@torch.no_grad()
def log_grids(writer, model, fixed_images, fixed_noise, step):
    """originals, reconstructions (decoded from the posterior mean) and prior samples, same inputs every epoch.

    Per-epoch logs use the global step as their x-axis, like the per-step losses: one axis for every curve, and
    a resumed run's purge (at the checkpoint's step) removes whatever a crashed session logged after it.
    """
    model = unwrap(model)
    was_training = model.training
    model.eval()
    nrow = max(1, int(math.sqrt(len(fixed_images))))
    reconstructions = model.decode(model.encode(fixed_images)[0])
    writer.add_image("originals", make_grid(fixed_images, nrow=nrow), step)
    writer.add_image("reconstructions", make_grid(reconstructions, nrow=nrow), step)
    writer.add_image("samples", make_grid(model.decode(fixed_noise), nrow=nrow), step)
    model.train(was_training)


def log_diagnostics(writer, step, sigma=None, **scalars):
    for name, value in scalars.items():
        writer.add_scalar(f"train/{name}", value, step)
    if sigma is not None:
        writer.add_scalar("train/decoder_sigma", sigma.exp().item(), step)


def log_evaluation(writer, step, metrics):
    for name, value in metrics.items():
        if isinstance(value, list):
            writer.add_histogram(f"eval/{name}", torch.tensor(value), step)
        else:
            writer.add_scalar(f"eval/{name}", value, step)


def resolve_resume(resume, config, explicit):
    """(checkpoint or None, config, its path). A resumed run takes its settings from the checkpoint; flags given
    explicitly must agree with it, except RESUMABLE_FLAGS."""
    if not resume:
        return None, config, None
    if resume == "auto":
        if not config.run_name:
            raise UserError("--resume auto needs --run-name to find LOG_DIR/RUN_NAME/checkpoint.pt")
        path = Path(config.log_dir) / config.run_name / "checkpoint.pt"
        if not path.exists():
            print(f"no checkpoint at {path} yet: starting the run")
            return None, config, None
    else:
        path = Path(resume)
    checkpoint = load_checkpoint(path)
    saved = checkpoint["config"]
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(saved) - known)
    if unknown:
        raise UserError(f"{path} has settings this code does not know ({', '.join(unknown)}); it comes from "
                        f"another version or model: start a new run")
    resumed = TrainConfig(**{**dataclasses.asdict(config), **saved})
    for name in sorted(explicit):
        value = getattr(config, name)
        if name in RESUMABLE_FLAGS:
            setattr(resumed, name, value)
        elif value != saved.get(name, value):
            flag = "--" + name.replace("_", "-")
            allowed = ", ".join("--" + f.replace("_", "-") for f in sorted(RESUMABLE_FLAGS))
            raise UserError(f"{path} was trained with {flag} {saved[name]}, not {value}; drop {flag} to resume "
                            f"(only {allowed} may change) or start a new run")
    if "run_name" not in explicit and "log_dir" not in explicit:
        resumed.run_name, resumed.log_dir = path.parent.name, str(path.parent.parent)
    return checkpoint, resumed, path


def check_writable(run_dir):
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise UserError(f"cannot write the run folder {run_dir} ({error.strerror}); "
                        f"pass a writable --log-dir") from None


def write_manifest(run_dir, config, resumed_from):
    manifest = {"config": dataclasses.asdict(config), "versions": library_versions(), "git_sha": git_sha(),
                "command": sys.argv, "started": datetime.now().astimezone().isoformat(timespec="seconds"),
                "resumed_from": str(resumed_from) if resumed_from else None}
    name = "run.json" if not resumed_from else f"run-resumed-{datetime.now():%Y%m%d-%H%M%S}.json"
    (run_dir / name).write_text(json.dumps(manifest, indent=2) + "\n")


def train(config, resume="", explicit=None):
    """The whole run. Returns the exit code: 0, or 130/143 when stopped by SIGINT/SIGTERM.

    explicit: the flags the user gave (None: every field of config counts as given, as from Python).
    Under torchrun every process calls this; it joins the process group and leaves it at the end.
    """
    explicit = {f.name for f in dataclasses.fields(TrainConfig)} if explicit is None else explicit
    checkpoint, config, checkpoint_path = resolve_resume(resume, config, explicit)
    validate_config(config)
    process = distributed.setup(config.device)
    try:
        return run(config, checkpoint, checkpoint_path, process)
    finally:
        distributed.teardown()


def make_optimizer(model, config):
    """Adam at --lr, except the learned decoder log sigma, a single scalar, at --sigma-lr."""
    sigma = [p for name, p in model.named_parameters() if name == "raw_log_sigma"]
    others = [p for name, p in model.named_parameters() if name != "raw_log_sigma"]
    groups = [{"params": others}] + ([{"params": sigma, "lr": config.sigma_lr}] if sigma else [])
    return torch.optim.Adam(groups, lr=config.lr)


def prepare_model(config, process, checkpoint, checkpoint_path):
    """(model, optimizer): built from the config, restored from the checkpoint, wrapped for DDP/compile."""
    model = build_model(config).to(process.device)
    optimizer = make_optimizer(model, config)
    if checkpoint is not None:
        restore_model(model, checkpoint, checkpoint_path)
        optimizer.load_state_dict(checkpoint["optimizer"])
    if process.distributed:
        device_ids = [process.device.index] if process.device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if config.compile:
        model = torch.compile(model)
    return model, optimizer


def run(config, checkpoint, checkpoint_path, process):
    main = process.is_main
    say = print if main else (lambda *args, **kwargs: None)
    if not config.run_name:
        config.run_name = distributed.broadcast_object(datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
    run_dir = Path(config.log_dir) / config.run_name
    if main:
        if checkpoint is None and (run_dir / "checkpoint.pt").exists():
            raise UserError(f"{run_dir} already holds a run; continue it with --resume auto --run-name "
                            f"{config.run_name}, or start a new one under another --run-name")
        check_writable(run_dir)
    device = process.device
    if config.amp and device.type != "cuda":
        raise UserError(f"--amp (bf16 autocast) needs a CUDA device, not {device.type}; drop --amp")
    seed_everything(config.seed)

    # The main process builds the image cache; the others wait and then load it.
    if main:
        train_images, eval_images = load_data(config)
    distributed.barrier()
    if not main:
        train_images, eval_images = load_data(config)
    model, optimizer = prepare_model(config, process, checkpoint, checkpoint_path)
    loss_fn = ELBOLoss(config.beta, config.likelihood, config.free_bits)
    batches = ImageBatches(train_images, config.batch_size // process.world_size, device, shuffle=True,
                           seed=config.seed, rank=process.rank, world_size=process.world_size)
    schedule = schedule_for(config, len(batches))
    state = {"epoch": 0, "step": 0, "batch": 0, "best_eval": math.inf}
    metrics = None
    if checkpoint is not None:
        if schedule.kind == "cyclical" and checkpoint["schedule"].get("total_steps") != schedule.total_steps:
            say(f"the cyclical KL schedule now spans {schedule.total_steps} steps, not "
                f"{checkpoint['schedule'].get('total_steps')}: the run's length in steps changed")
        state.update({k: checkpoint[k] for k in state})
        metrics = checkpoint.get("eval")
        try:
            set_rng_state(checkpoint["rng"], device)
        except UserError as error:
            raise UserError(f"{checkpoint_path}: {error}") from None
        say(f"resuming {run_dir} at epoch {state['epoch'] + 1}, step {state['step']}")
    if process.rank > 0:  # every process draws its own reparameterisation noise
        torch.manual_seed(config.seed + 7919 * process.rank + state["step"])
    if main:
        write_manifest(run_dir, config, resumed_from=checkpoint_path if checkpoint is not None else None)

    eval_batches = None if eval_images is None else ImageBatches(
        eval_images, 256, device, shuffle=False, rank=process.rank, world_size=process.world_size)
    grid_source = eval_images if eval_images is not None else train_images
    fixed_images = to_float(grid_source[:config.grid_size].to(device))
    fixed_noise = torch.randn(config.grid_size, config.latent_size,
                              generator=torch.Generator().manual_seed(config.seed)).to(device)
    parallel = f" x {process.world_size} processes" if process.distributed else ""
    say(f"training on {len(train_images)} images ({device}{parallel}), evaluating on "
        f"{len(eval_images) if eval_images is not None else 0}; "
        f"{sum(p.numel() for p in unwrap(model).parameters()):,} parameters; run folder {run_dir}")

    def save(path):
        if main:
            save_checkpoint(path, model=unwrap(model).state_dict(), optimizer=optimizer.state_dict(),
                            schedule=schedule.state_dict(), rng=rng_state(device), config=dataclasses.asdict(config),
                            eval=metrics, **state)

    timer = Timer(config.checkpoint_every)
    writer = None
    if main:
        # purge_step drops events a crashed run logged after its last checkpoint: resumed curves have no duplicates.
        writer = SummaryWriter(str(run_dir), purge_step=state["step"] + 1 if checkpoint is not None else None)
        if checkpoint is not None:  # the per-curve sub-runs of add_scalars("loss", ...) need the purge marker too
            purge_scalar_curves(writer, "loss", ("KL Loss", "Reconstruction Loss", "Total Loss"), state["step"] + 1)
    try:
        with StopRequest() as stop:
            session_start = state["step"]
            while state["epoch"] < config.epochs:
                if config.max_steps and state["step"] >= config.max_steps:
                    if state["step"] == session_start:
                        say(f"already at --max-steps {config.max_steps}; pass a larger --max-steps (or 0) to go on")
                    break
                epoch = state["epoch"]
                started, first_step = time.perf_counter(), state["step"]
                losses = train_one_epoch(model, batches, loss_fn, optimizer, epoch, state, schedule, writer, stop,
                                         on_timer=lambda: timer.due() and save(run_dir / "checkpoint.pt"),
                                         max_steps=config.max_steps, amp=config.amp, show_progress=main)
                elapsed = time.perf_counter() - started
                # Every process takes part in the reduction, so a signal that reached only one still stops all.
                if distributed.any_process(stop.requested, device):
                    save(run_dir / "checkpoint.pt")
                    say(f"\nstopped at step {state['step']}; checkpoint saved. Resume with: python vae_training.py "
                        f"--resume {run_dir / 'checkpoint.pt'}", file=sys.stderr)
                    return stop.exit_code if stop.requested else 143
                if state["batch"] >= len(batches):
                    state["epoch"], state["batch"] = epoch + 1, 0
                images_per_s = (state["step"] - first_step) * config.batch_size / max(elapsed, 1e-9)
                line = (f"epoch {epoch + 1}/{config.epochs} step {state['step']}: reconstruction "
                        f"{losses.get('Reconstruction Loss', math.nan):.2f}  KL {losses.get('KL Loss', math.nan):.3f}  "
                        f"total {losses.get('Total Loss', math.nan):.2f}")
                if main:
                    log_diagnostics(writer, state["step"], epoch=epoch + 1, images_per_s=images_per_s,
                                    kl_weight=loss_fn.beta,
                                    grad_norm=losses.pop("grad_norm"), lr=optimizer.param_groups[0]["lr"],
                                    sigma=unwrap(model).log_sigma())
                if eval_batches is not None:
                    with rng_untouched(device):  # evaluating must not move the training RNG stream
                        metrics = evaluate(model, eval_batches, config.beta)
                    line += (f" | eval -ELBO {metrics['neg_elbo_nats']:.1f} nats, {metrics['active_units']}/"
                             f"{config.latent_size} active units")
                    if main:
                        log_evaluation(writer, state["step"], metrics)
                    if metrics["neg_elbo_nats"] < state["best_eval"]:
                        state["best_eval"] = metrics["neg_elbo_nats"]
                        save(run_dir / "best.pt")
                if main:
                    log_grids(writer, model, fixed_images, fixed_noise, state["step"])
                    writer.flush()
                save(run_dir / "checkpoint.pt")
                say(line + f"  ({images_per_s:.0f} img/s)")
    except TrainingDiverged as error:
        kept = (f"{run_dir / 'checkpoint.pt'} keeps the last good state" if (run_dir / "checkpoint.pt").exists()
                else "no checkpoint had been saved yet")
        raise UserError(f"{error}; training stopped and {kept}. Lower --lr or --beta, or check the data") from None
    finally:
        if writer is not None:
            writer.close()
    if process.distributed:
        in_sync = distributed.replicas_in_sync(unwrap(model), device)
        say(f"parameters {'identical' if in_sync else 'DIFFER'} on all {process.world_size} processes")
    return 0


def main(argv=None):
    config, args, explicit = parse_args(argv)
    try:
        return train(config, resume=args.resume, explicit=explicit)
    except UserError as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted before training started; nothing to save", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
