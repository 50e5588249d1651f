"""Train the original VAE on Flowers102.

    python vae_training.py                        # the seed's run: train split, 32x32, latent 10, beta 0.1
    python vae_training.py --resolution 64 --run-name flowers64
    python vae_training.py --resume auto --run-name flowers64
    tensorboard --logdir runs

The pieces live in the package: the model in vae/vae.py, the loss in vae/losses.py, the training epoch and
the evaluation in vae/training.py. This script wires them together for one run, from top to bottom.
"""

import dataclasses
import math
import sys
import time

import torch

from datasets.preprocessing import (ImageBatches, flower_classes, holdout_split, random_subset, split_images,
                                    to_float)
from vae import distributed
from vae.checkpoint import checkpoint_to_resume, restore_model, save_checkpoint, unwrap
from vae.config import TrainConfig, build_parser, config_file_arguments, config_from_args, validate_config
from vae.errors import TrainingDiverged, UserError
from vae.inference import fit_samplers, sample_quality
from vae.logs import log_grids, log_run_summary, log_scalars, log_settings, open_writer
from vae.losses import ELBOLoss
from vae.rng import rng_state, set_rng_state
from vae.run_folder import claim, resume_command, write_manifest
from vae.training import (StopRequest, check_amp, evaluate, every, make_ema, make_kl_schedule, make_lr_schedule,
                          make_optimizer, memory_format, train_one_epoch)
from vae.vae import build_model

EVAL_BATCH_SIZE = 256


def parse_args(argv=None):
    """(config, args, names of the config flags given explicitly on the command line or in --config)."""
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
    explicit = {name for name, value in vars(parser.parse_args(argv)).items()
                if value is not unset and name in TrainConfig.__dataclass_fields__}
    config = config_from_args(args)
    if config.likelihood == "gaussian-learned" and "beta" not in explicit:
        config.beta = 1.0  # a learned sigma is calibrated by the ELBO itself, as in sigma-VAE
    return config, args, explicit


def load_split(config, split):
    """A split's (uint8 images (N, 3, R, R), file names) (several joined with +), through the image cache."""
    try:
        return split_images(config.data_dir, split, config.resolution, config.cache_dir, config.num_workers,
                            config.skip_bad_images)
    except UserError as error:
        if config.skip_bad_images or "cannot read image" not in str(error):
            raise
        raise UserError(f"{error}, or pass --skip-bad-images to leave unreadable images out") from None


def load_data(config):
    """(train images, eval images, eval file names): uint8 tensors, eval None with --eval-split none. The
    per-epoch evaluation set is a seeded random draw of --eval-size images: the split lists are sorted by class."""
    images, names = load_split(config, config.split)
    if config.holdout:  # holdout_split rejects a fraction outside [0, 1)
        train_index, eval_index = holdout_split(len(images), config.holdout, config.seed)
        train_images, eval_images, eval_names = images[train_index], images[eval_index], \
            [names[i] for i in eval_index.tolist()]
    else:
        train_images = images
        eval_images, eval_names = (None, []) if config.eval_split == "none" else load_split(config, config.eval_split)
    if config.batch_size > len(train_images):
        raise UserError(f"--batch-size {config.batch_size} is larger than the {len(train_images)} training images; "
                        f"use --batch-size {len(train_images)} or less")
    if eval_images is not None:
        subset = random_subset(len(eval_images), config.eval_size, config.seed)
        eval_images, eval_names = eval_images[subset], [eval_names[i] for i in subset.tolist()]
    return train_images, eval_images, eval_names


def train(config, resume="", explicit=()):
    """The whole run; returns the exit code: 0, or 130/143 when stopped by SIGINT/SIGTERM. Under torchrun every
    process runs this; only process 0 writes files and prints."""
    checkpoint, checkpoint_path, config = checkpoint_to_resume(resume, config, explicit)
    validate_config(config)
    process = distributed.setup(config.device)
    main_process, device = process.is_main, process.device
    say = print if main_process else (lambda *args, **kwargs: None)
    if config.amp and main_process:
        check_amp(device)
    run_dir, lock = None, None
    if main_process:
        run_dir, lock = claim(config.log_dir, config.run_name or None, resumed_from=checkpoint_path)
        config.run_name = run_dir.name
    config.run_name = distributed.broadcast_object(config.run_name)
    torch.manual_seed(config.seed)

    # Data: the main process builds the image cache first; the others then load it.
    with distributed.main_process_first(process):
        train_images, eval_images, eval_names = load_data(config)
    batches = ImageBatches(train_images, config.batch_size // process.world_size, device, shuffle=True,
                           seed=config.seed, rank=process.rank, world_size=process.world_size, hflip=config.hflip)
    eval_batches = None if eval_images is None else ImageBatches(
        eval_images, EVAL_BATCH_SIZE, device, shuffle=False, rank=process.rank, world_size=process.world_size)
    grid_source = eval_images if eval_images is not None else train_images
    fixed_images = to_float(grid_source[random_subset(len(grid_source), config.grid_size, config.seed)].to(device))

    # Model, optimizer and schedule, then the checkpoint's state over them.
    model = build_model(config).to(device, memory_format=memory_format(config, device))
    optimizer = make_optimizer(model, config)
    kl_schedule = make_kl_schedule(config, len(batches))
    lr_schedule = make_lr_schedule(config, optimizer, len(batches))
    ema = make_ema(model, config.ema)
    loss_fn = ELBOLoss(config.beta, config.likelihood, config.free_bits)
    fixed_noise = torch.randn(config.grid_size, *model.latent_shape,
                              generator=torch.Generator().manual_seed(config.seed)).to(device)
    state = {"epoch": 0, "step": 0, "batch": 0, "best_eval": math.inf}
    metrics, samplers = None, None
    if checkpoint is not None:
        restore_model(model, checkpoint, checkpoint_path)
        optimizer.load_state_dict(checkpoint["optimizer"])
        if "lr_schedule" in checkpoint:
            lr_schedule.load_state_dict(checkpoint["lr_schedule"])
        if ema is not None:
            restore_model(ema.module, checkpoint, checkpoint_path, key="ema_model")
            ema.n_averaged.fill_(checkpoint["step"])  # one update per step: the warm-up resumes where it was
        state.update({key: checkpoint.get(key, value) for key, value in state.items()})
        metrics = checkpoint.get("eval")
        set_rng_state(checkpoint["rng"], device, checkpoint_path)
        say(f"resuming {run_dir} at epoch {state['epoch'] + 1}, step {state['step']}")
    if process.rank > 0:  # every process draws its own reparameterisation noise
        torch.manual_seed(config.seed + 7919 * process.rank + state["step"])
    if process.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        model = torch.compile(model)
    eval_model = ema.module if ema is not None else model  # evaluation, grids and best.pt use the average
    say(f"training on {len(train_images)} images ({device}"
        f"{f' x {process.world_size} processes' if process.distributed else ''}), evaluating on "
        f"{0 if eval_images is None else len(eval_images)}; "
        f"{sum(p.numel() for p in unwrap(model).parameters()):,} parameters; run folder {run_dir}")

    def save(name):
        if main_process:
            extra = {"ema_model": ema.module.state_dict()} if ema is not None else {}
            extra.update({"samplers": samplers} if samplers else {})
            save_checkpoint(run_dir / name, model=unwrap(model).state_dict(), optimizer=optimizer.state_dict(),
                            schedule=kl_schedule.state_dict(), lr_schedule=lr_schedule.state_dict(),
                            rng=rng_state(device), config=dataclasses.asdict(config), eval=metrics, **state, **extra)

    save_when_due = every(config.checkpoint_every, lambda: save("checkpoint.pt"))  # also within an epoch
    writer = None
    if main_process:
        write_manifest(run_dir, config, resumed_from=checkpoint_path)
        writer = open_writer(run_dir, resumed_step=state["step"] if checkpoint is not None else None)
        log_settings(writer, config)
    try:
        with StopRequest() as stop:
            session_start = state["step"]
            while state["epoch"] < config.epochs:
                if config.max_steps and state["step"] >= config.max_steps:
                    if state["step"] == session_start:
                        say(f"already at --max-steps {config.max_steps}; pass a larger --max-steps (or 0) to go on")
                    break
                epoch, first_step, started = state["epoch"], state["step"], time.perf_counter()
                losses = train_one_epoch(model, batches, loss_fn, optimizer, epoch, state, kl_schedule, lr_schedule,
                                         ema, config.grad_clip, writer, stop, after_step=save_when_due,
                                         max_steps=config.max_steps, amp=config.amp,
                                         input_format=memory_format(config, device), show_progress=main_process)
                images_per_s = (state["step"] - first_step) * config.batch_size / (time.perf_counter() - started)
                # Every process takes part in the reduction, so a signal that reached only one still stops all.
                if distributed.any_process(stop.requested, device):
                    save("checkpoint.pt")
                    say(f"\nstopped at step {state['step']}; checkpoint saved. Resume with: "
                        f"{resume_command(run_dir / 'checkpoint.pt')}", file=sys.stderr)
                    return stop.exit_code if stop.requested else 143
                if state["batch"] >= len(batches):
                    state["epoch"], state["batch"] = epoch + 1, 0
                line = (f"epoch {epoch + 1}/{config.epochs} step {state['step']}: reconstruction "
                        f"{losses.get('Reconstruction Loss', math.nan):.2f}  KL {losses.get('KL Loss', math.nan):.3f}  "
                        f"total {losses.get('Total Loss', math.nan):.2f}")
                if eval_batches is not None:
                    # A fixed generator: the same noise every epoch, and the training RNG stream is not touched.
                    metrics = evaluate(eval_model, eval_batches, config.beta,
                                       generator=torch.Generator().manual_seed(config.seed))
                    line += (f" | eval -ELBO {metrics['neg_elbo_nats']:.1f} nats, "
                             f"{metrics['active_units']}/{metrics['latent_size']} active units")
                    if main_process:
                        log_scalars(writer, state["step"], "eval", metrics)
                    if metrics["neg_elbo_nats"] < state["best_eval"]:
                        state["best_eval"] = metrics["neg_elbo_nats"]
                        save("best.pt")
                if main_process:
                    log_scalars(writer, state["step"], "train", {
                        "epoch": epoch + 1, "images_per_s": images_per_s, "kl_weight": loss_fn.beta,
                        "grad_norm": losses.pop("grad_norm"), "lr": optimizer.param_groups[0]["lr"]})
                    if unwrap(model).log_sigma() is not None:
                        writer.add_scalar("train/decoder_sigma", unwrap(model).log_sigma().exp().item(), state["step"])
                    log_grids(writer, eval_model, fixed_images, fixed_noise, state["step"])
                    writer.flush()
                save("checkpoint.pt")
                say(line + f"  ({images_per_s:.0f} img/s)")
            if main_process and state["epoch"] >= config.epochs:
                # Samplers of the training images' posteriors (a GMM, and the diffusion prior when asked), so that
                # sampling and variations need no data.
                kinds = ("gmm", "diffusion") if config.diffusion_prior_steps else ("gmm",)
                samplers = fit_samplers(unwrap(eval_model), train_images, kinds, seed=config.seed, hflip=config.hflip,
                                        diffusion_steps=config.diffusion_prior_steps, progress=True)
                if config.fid_samples and eval_images is not None:
                    quality = sample_quality(unwrap(eval_model), samplers[kinds[-1]], eval_images, config.fid_samples,
                                             1.0, torch.Generator().manual_seed(config.seed), device)
                    metrics = {**(metrics or {}), **quality}
                save("checkpoint.pt")
                log_run_summary(writer, config, metrics, eval_model, eval_images,
                                flower_classes(config.data_dir, eval_names), state["step"])
    except TrainingDiverged as error:
        kept = (f"{run_dir / 'checkpoint.pt'} keeps the last good state" if (run_dir / "checkpoint.pt").exists()
                else "no checkpoint had been saved yet")
        raise UserError(f"{error}; training stopped and {kept}. Lower --lr or --beta, or check the data") from None
    finally:
        if writer is not None:
            writer.close()
        if lock is not None:
            lock.close()
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
    finally:
        distributed.teardown()


if __name__ == "__main__":
    sys.exit(main())
