"""Train the original VAE on Flowers102.

    python vae_training.py                        # the tutorial's run: train split, 32x32, latent 10, beta 0.1
    python vae_training.py --resolution 64 --run-name flowers64
    python vae_training.py --resume auto --run-name flowers64
    tensorboard --logdir runs

The pieces live in the package: the model in vae/vae.py, the loss in vae/losses.py, the training epoch and
the evaluation in vae/training.py. This script wires them together for one run, from top to bottom.
"""

import vae.quiet_start  # first: Ctrl-C while the libraries below load exits at once (see its docstring)

import dataclasses
import math
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from datasets.batches import ImageBatches, fingerprint, random_subset, to_float
from datasets.folders import class_labels, flower_classes, inside_images_folder, is_image_folder
from datasets.preprocessing import dataset_images
from vae import distributed
from vae.checkpoint import check_finite, checkpoint_to_resume, finished, restore_model, save_checkpoint, unwrap
from vae.config import (TrainConfig, build_parser, check_fid_sizes, config_file_arguments, config_from_args,
                        validate_config)
from vae.errors import EveryProcessError, ResumableError, Stopped, TrainingDiverged, UserError
from vae.evaluation import evaluate, sample_quality
from vae.files import disk_full, write_failure
from vae.samplers import check_enough_images, fit_samplers, fitted_after_training, load_sampler
from vae.logs import fixed_grids, log_run_summary, log_scalars, log_settings, open_writer, writer_thread_errors
from vae.likelihoods import LIKELIHOODS
from vae.losses import ELBOLoss
from vae.rng import rng_state, set_rng_state
from vae.run_folder import claim, holds_unsaved_run, release_unsaved, write_manifest
from vae.threads import available_cores, choose_threads, describe
from vae.training import (Optimization, StopRequest, TrainState, check_amp, every, memory_format,
                          train_one_epoch, training_step_probe)
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
    default_beta = LIKELIHOODS[config.likelihood].default_beta
    if default_beta is not None and "beta" not in explicit:
        config.beta = default_beta  # e.g. a learned sigma is calibrated by the ELBO itself, as in sigma-VAE
    return config, args, explicit


def load_split(config, split, subset="all"):
    """(uint8 images (N, 3, R, R), names) of a split (several joined with +), or of its training or held-out part
    with --holdout, through the image cache."""
    try:
        return dataset_images(config.data_dir, split, config.resolution, subset, config.holdout, config.seed,
                              config.cache_dir, config.num_workers, config.skip_bad_images, config.resize)
    except UserError as error:
        if config.skip_bad_images or "cannot read image" not in str(error):
            raise
        raise UserError(f"{error}, or pass --skip-bad-images to leave unreadable images out") from None


def load_data(config):
    """(train images, their classes, eval images, their class labels): uint8 tensors, eval None with --eval-split
    none. The per-epoch evaluation set is a seeded random draw of --eval-size images: Flowers102's split lists are
    sorted by class. The labels (for the projector at the end) are read now, so that damaged labels stop the run
    before it trains."""
    if is_image_folder(config.data_dir) and not config.holdout and config.eval_split != "none":
        raise UserError(f"{config.data_dir} is a folder of images, which has no {config.eval_split} split to "
                        f"evaluate on: pass --holdout 0.1 to hold a tenth of it out, or --eval-split none")
    train_images, train_names = load_split(config, config.split, "train")
    if config.holdout:
        eval_images, eval_names = load_split(config, config.split, "held-out")
    else:
        eval_images, eval_names = (None, []) if config.eval_split == "none" else load_split(config, config.eval_split)
    if config.batch_size > len(train_images):
        raise UserError(f"--batch-size {config.batch_size} is larger than the {len(train_images)} training images; "
                        f"use --batch-size {len(train_images)} or less")
    check_enough_images(fitted_after_training(config), len(train_images),  # they are fitted after the last epoch
                        "add photos" + (", or lower --holdout" if config.holdout else ""))
    if eval_images is not None:
        subset = random_subset(len(eval_images), config.eval_size, config.seed)
        eval_images, eval_names = eval_images[subset], [eval_names[i] for i in subset.tolist()]
        check_fid_sizes(config.fid_samples, len(eval_images))  # now, not after the whole run
    return (train_images, flower_classes(config.data_dir, train_names), eval_images,
            class_labels(config.data_dir, eval_names) if eval_names else [])


def check_log_dir_outside_the_images(config):
    """A run inside a folder of images would be part of it: the projector's thumbnails would be read as photos,
    a class of their own, by the next run."""
    if is_image_folder(config.data_dir) and inside_images_folder(config.data_dir, config.log_dir):
        raise UserError(f"--log-dir {config.log_dir} is inside {config.data_dir}, the folder of images the run "
                        f"trains on: its files would become part of the data; pass a --log-dir outside it")


class Checkpoints:
    """Writes the run's checkpoints, on the main process only: the model, the optimization's state, the
    TrainState (and the latest evaluation, state.eval), the RNG states and the config. It holds the run's objects,
    which change in place, never a value that is reassigned."""

    def __init__(self, run_dir, config, model, optimization, state, device, enabled, data):
        self.run_dir, self.config, self.model, self.optimization = run_dir, config, model, optimization
        self.state, self.device, self.enabled, self.data = state, device, enabled, data

    def save(self, name="checkpoint.pt", samplers=None):
        if not self.enabled:
            return
        state = self.state.as_dict()
        save_checkpoint(self.run_dir / name, model=unwrap(self.model).state_dict(), **self.optimization.state_dict(),
                        rng=rng_state(self.device), config=dataclasses.asdict(self.config), eval=state.pop("eval"),
                        data=self.data, **state, **({"samplers": samplers} if samplers else {}))


def check_same_data(checkpoint, data, config, path):
    """A resumed run trains and evaluates on the images it started with: data that moved must be the same photos."""
    saved = checkpoint.get("data")  # absent in checkpoints written before the data were fingerprinted
    for split in ("train", "eval"):
        if saved is not None and saved[split] != data[split]:
            raise UserError(
                f"--data-dir {config.data_dir} gives other {split} images than {path} was trained on "
                f"({data[split]['images']} images now, {saved[split]['images']} then, or the same number with "
                f"other pixels); resume with the data set the run used (moved is fine, changed is not), or start "
                f"a new run")


@dataclasses.dataclass
class Run:
    """One training's pieces, made by setup_run and shared by the epoch loop and the end of the run. The lock and
    the writer are the main process's (None on the others)."""
    config: TrainConfig
    process: distributed.Process
    say: Callable  # print on the main process and silent on the others, so that each message appears once
    run_dir: Path
    lock: Any
    writer: Any
    started: float  # time.perf_counter() when the run began, for the closing line
    train_images: torch.Tensor
    train_classes: list  # each training image's class, 0 where unknown (the kind sampler learns from them)
    eval_images: torch.Tensor | None
    eval_labels: list  # each held-out image's class label, for the projector (datasets.folders.class_labels)
    batches: ImageBatches
    eval_batches: ImageBatches | None
    fixed_images: torch.Tensor  # the grids' test batch and prior noise: the same every epoch, so frames compare
    fixed_noise: torch.Tensor
    model: torch.nn.Module  # the one that trains, under DDP and torch.compile when they are on
    eval_model: torch.nn.Module  # the one evaluated, drawn and kept in best.pt: the EMA copy when there is one
    optimization: Optimization
    loss_fn: ELBOLoss
    state: TrainState
    checkpoints: Checkpoints


def train(config, resume="", explicit=()):
    """The whole run; returns the exit code: 0, or 130/143 when stopped by SIGINT/SIGTERM. Under torchrun every
    process runs this; only process 0 writes files and prints."""
    checkpoint, checkpoint_path, config = checkpoint_to_resume(resume, config, explicit)
    validate_config(config)
    check_log_dir_outside_the_images(config)
    if checkpoint is not None and finished(checkpoint, config):
        print(f"{checkpoint_path} is a finished run: {checkpoint['epoch']} of {config.epochs} epochs, samplers fitted; "
              f"nothing to do (pass a larger --epochs to train on)")
        return 0
    try:
        run = setup_run(config, checkpoint, checkpoint_path, restart_unsaved=resume == "auto")
    except OSError as error:  # a write before the first step: the manifest, TensorBoard's first event
        raise write_failed(error, saved=checkpoint_path) from None
    with writer_thread_errors() as lost_events:  # TensorBoard writes from a thread: its failures land here
        try:
            with StopRequest(config.max_steps) as stop:
                stopped = run_epochs(run, stop)
                # A session that --max-steps ended short of --epochs is not the end of the run: a resume trains on.
                if stopped is None and run.process.is_main and run.state.epoch >= config.epochs:
                    stopped = end_of_run(run, stop)
        except TrainingDiverged as error:
            kept = (f"{run.run_dir / 'checkpoint.pt'} keeps the last good state"
                    if (run.run_dir / "checkpoint.pt").exists() else "no checkpoint had been saved yet")
            raise EveryProcessError(f"{error}; training stopped and {kept}. Lower --lr or --beta, or check the "
                                    f"data") from None
        except OSError as error:  # a write during the run: a grid, an event, the projector, the end-of-run files
            raise write_failed(error, saved=last_checkpoint(run.run_dir)) from None
        except RuntimeError as error:
            if not distributed.peer_lost(error):
                raise
            # torchrun sends this process SIGTERM as it notices the other one gone: let this line be said first.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            saved = last_checkpoint(run.run_dir)
            reason = str(error).split("] ", 1)[-1].split(". ", 1)[0]  # gloo's words, without its source location
            raise ResumableError(f"another process of this run stopped ({reason}), so this one stops too; "
                                 + (f"the last checkpoint, {saved}, is kept. Resume it with torchrun as before plus "
                                    f"--resume, or on one process" if saved else "nothing was saved yet"),
                                 saved) from None
        finally:
            close_run(run, lost_events)
    if lost_events:
        print(f"warning: some TensorBoard events of {run.run_dir} were not written "
              f"({write_failure(lost_events[0])}); the checkpoints are whole", file=sys.stderr)
    if stopped is not None:
        return stopped
    if run.process.distributed:
        in_sync = distributed.replicas_in_sync(unwrap(run.model), run.process.device)
        run.say(f"parameters {'identical' if in_sync else 'DIFFER'} on all {run.process.world_size} processes")
    return 0


def close_run(run, lost_events):
    """Close the run's TensorBoard writer (its last events are written now: a failure joins lost_events) and its
    folder's lock."""
    try:
        if run.writer is not None:
            run.writer.close()
    except OSError as error:
        lost_events.append(error)
    finally:
        if run.lock is not None:
            run.lock.close()


def last_checkpoint(run_dir):
    """The run's newest saved state: checkpoint.pt, else best.pt (a first save that failed half-way), else None."""
    return next((path for path in (run_dir / "checkpoint.pt", run_dir / "best.pt") if path.is_file()), None)


def write_failed(error, saved):
    """The one-line error of a write that failed (a full disk, a folder gone read-only): the file, the reason, and
    the command that goes on from `saved`, the last checkpoint kept (None: nothing was saved, and the run's
    command starts it again: setup_run left no folder behind)."""
    fix = "Free some disk space" if disk_full(error) else "Make that path a writable folder or file"
    if saved is None:
        return UserError(f"{write_failure(error)}; nothing of the run was saved. {fix}, then run the same command "
                         f"again (with --resume auto if the run folder is still there)")
    return ResumableError(f"{write_failure(error)}; the last checkpoint, {saved}, is kept. {fix}, then resume it",
                          saved)


def setup_run(config, checkpoint, checkpoint_path, restart_unsaved):
    """The process, the run folder, the data, the model and the checkpoint's state over them, and the writer."""
    process = distributed.setup(config.device)
    device = process.device
    say = print if process.is_main else (lambda *args, **kwargs: None)
    if config.amp and process.is_main:
        check_amp(device)
    new_folder = not config.run_name or not (Path(config.log_dir) / config.run_name).exists()
    run_dir, lock, restarted = claim_run_folder(config, process, checkpoint, checkpoint_path, restart_unsaved)

    try:
        return prepare_run(config, checkpoint, checkpoint_path, process, say, run_dir, lock, restarted)
    except (UserError, OSError):
        if lock is not None and new_folder:  # refused, or a full disk, before the first step: leave no folder
            release_unsaved(run_dir, lock)
        raise


def prepare_run(config, checkpoint, checkpoint_path, process, say, run_dir, lock, restarted):
    """setup_run's work once the run folder is claimed."""
    device = process.device
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    with distributed.main_process_first(process):  # the main process builds the image cache; the others load it
        train_images, train_classes, eval_images, eval_labels = load_data(config)
    data = {"train": fingerprint(train_images), "eval": fingerprint(eval_images)}
    if checkpoint is not None:
        check_same_data(checkpoint, data, config, checkpoint_path)
    batches = ImageBatches(train_images, config.batch_size // process.world_size, device, shuffle=True,
                           seed=config.seed, rank=process.rank, world_size=process.world_size, hflip=config.hflip)
    eval_batches = None if eval_images is None else ImageBatches(
        eval_images, EVAL_BATCH_SIZE, device, shuffle=False, rank=process.rank, world_size=process.world_size)

    model = build_model(config).to(device, memory_format=memory_format(config, device))
    if device.type == "cpu":
        choose_cpu_threads(config, model, batches, process, say)
    optimization = Optimization(model, config, steps_per_epoch=len(batches))
    loss_fn = ELBOLoss(config.beta, model.likelihood, config.free_bits)
    fixed_images, fixed_noise = grid_inputs(config, model, train_images, eval_images, device)
    state = TrainState()
    if checkpoint is not None:
        state = resumed_state(checkpoint, checkpoint_path, model, optimization, device)
        say(f"resuming {run_dir} at epoch {state.epoch + 1}, step {state.step}")
    if process.rank > 0:  # every process draws its own reparameterisation noise
        torch.manual_seed(config.seed + 7919 * process.rank + state.step)
    eval_model = optimization.ema.module if optimization.ema is not None else model
    checkpoints = Checkpoints(run_dir, config, model, optimization, state, device, enabled=process.is_main, data=data)
    model = parallel(model, config, process)
    say(f"training on {len(train_images)} images ({device}"
        f"{f' x {process.world_size} processes' if process.distributed else ''}), evaluating on "
        f"{0 if eval_images is None else len(eval_images)}; "
        f"{sum(p.numel() for p in unwrap(model).parameters()):,} parameters; run folder {run_dir}")
    writer = None
    if process.is_main:
        # A resumed run drops what a killed session logged after its checkpoint; a restarted one all of it.
        writer = open_run_writer(config, run_dir, checkpoint_path, state.step if checkpoint is not None else restarted)
    return Run(config=config, process=process, say=say, run_dir=run_dir, lock=lock, writer=writer, started=started,
               train_images=train_images, train_classes=train_classes, eval_images=eval_images,
               eval_labels=eval_labels, batches=batches, eval_batches=eval_batches, fixed_images=fixed_images,
               fixed_noise=fixed_noise, model=model, eval_model=eval_model, optimization=optimization,
               loss_fn=loss_fn, state=state, checkpoints=checkpoints)


def claim_run_folder(config, process, checkpoint, checkpoint_path, restart_unsaved):
    """(run folder, its lock, restarted). The main process claims the folder and holds its lock (None on the
    others, which learn the folder's name from it). restarted is -1 when --resume auto starts again in a folder
    whose run was killed before its first checkpoint, else None."""
    lock, restarted = None, None
    with distributed.errors_of_the_main_process(process):
        if process.is_main:
            run_dir, lock = claim(config.log_dir, config.run_name or None, resumed_from=checkpoint_path,
                                  restart_unsaved=restart_unsaved)
            restarted = -1 if checkpoint is None and restart_unsaved and holds_unsaved_run(run_dir) else None
            config.run_name = run_dir.name
    config.run_name = distributed.broadcast_object(config.run_name)
    return Path(config.log_dir) / config.run_name, lock, restarted  # on every process, for its messages


def grid_inputs(config, model, train_images, eval_images, device):
    """(test batch, prior noise) of the image grids: a seeded draw of --grid-size held-out images (training images
    without them) and seeded noise."""
    images = eval_images if eval_images is not None else train_images
    fixed_images = to_float(images[random_subset(len(images), config.grid_size, config.seed)].to(device))
    fixed_noise = torch.randn(config.grid_size, *model.latent_shape,
                              generator=torch.Generator().manual_seed(config.seed)).to(device)
    return fixed_images, fixed_noise


def resumed_state(checkpoint, path, model, optimization, device):
    """The checkpoint's TrainState, after its weights, optimization state and RNG states are restored in place."""
    restore_model(model, checkpoint, path)
    optimization.load_state_dict(checkpoint, path, restore_model)
    state = TrainState(**{key: checkpoint.get(key, value) for key, value in TrainState().as_dict().items()})
    set_rng_state(checkpoint["rng"], device, path)
    return state


def parallel(model, config, process):
    """The model as it trains: under DistributedDataParallel with torchrun, compiled with --compile."""
    if process.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[process.device.index] if process.device.type == "cuda" else None)
    if config.compile:
        model = torch.compile(model)
    return model


def open_run_writer(config, run_dir, checkpoint_path, resumed_step):
    """The run's TensorBoard writer, with its settings logged, after the run's manifest is written."""
    write_manifest(run_dir, config, resumed_from=checkpoint_path)
    writer = open_writer(run_dir, resumed_step=resumed_step)
    log_settings(writer, config)
    return writer


def run_epochs(run, stop):
    """Train, evaluate, log and save each epoch up to --epochs (or --max-steps). Returns the exit code when a stop
    request ended the run, else None."""
    state, config = run.state, run.config
    save_when_due = every(config.checkpoint_every, run.checkpoints.save)  # also within an epoch
    session_start = state.step
    while state.epoch < config.epochs:
        if stop.at_max_steps(state.step):
            if state.step == session_start:
                run.say(f"already at --max-steps {config.max_steps}; pass a larger --max-steps (or 0) to go on")
            break
        epoch, first_step, epoch_start = state.epoch, state.step, time.perf_counter()
        losses = train_one_epoch(run.model, run.batches, run.loss_fn, run.optimization, state, run.writer, stop,
                                 after_step=save_when_due, progress=run.process.is_main)
        images_per_s = (state.step - first_step) * config.batch_size / (time.perf_counter() - epoch_start)
        # A finite last loss can still have stepped into non-finite weights: stop before they are logged.
        check_finite(unwrap(run.model).state_dict(), state.step)
        # Every process takes part in the reduction, so a signal that reached only one still stops all.
        if distributed.any_process(stop.requested, run.process.device):
            return save_and_stop(run, stop)
        if state.batch >= len(run.batches):
            state.epoch, state.batch = epoch + 1, 0
        # Every process draws the grids: weights that are finite but too large for finite images stop all.
        grids = fixed_grids(run.eval_model, run.fixed_images, run.fixed_noise)
        check_finite(grids, state.step, "image grid of")
        evaluation = None if run.eval_batches is None else evaluate_epoch(run)
        if run.process.is_main:
            log_epoch(run.writer, state.step, epoch, losses, images_per_s, run.loss_fn, run.optimization, run.model,
                      grids)
        run.checkpoints.save()
        run.say(epoch_line(config, epoch, state.step, losses, evaluation, images_per_s))
    return None


def save_and_stop(run, stop):
    """Saves the checkpoint and says how to resume; returns the exit code: the signal's, or SIGTERM's on a process
    that another one's signal stopped."""
    run.checkpoints.save()
    run.say(f"\nstopped at step {run.state.step}; checkpoint saved. Resume with: "
            f"{resume_command(run.run_dir / 'checkpoint.pt')}", file=sys.stderr)
    return stop.exit_code if stop.requested else 143


def evaluate_epoch(run):
    """The held-out evaluation, into state.eval and TensorBoard; a new best -ELBO saves best.pt. Returns it."""
    state, config = run.state, run.config
    # A fixed generator: the same noise every epoch, and the training RNG stream is not touched.
    state.eval = evaluate(run.eval_model, run.eval_batches, config.beta,
                          generator=torch.Generator().manual_seed(config.seed))
    if not math.isfinite(state.eval["neg_elbo_nats"]):
        raise TrainingDiverged(f"the held-out -ELBO became {state.eval['neg_elbo_nats']} at step {state.step}")
    if run.process.is_main:
        log_scalars(run.writer, state.step, "eval", state.eval)
    if state.eval["neg_elbo_nats"] < state.best_eval:
        state.best_eval = state.eval["neg_elbo_nats"]
        run.checkpoints.save("best.pt")
    return state.eval


def epoch_line(config, epoch, step, losses, evaluation, images_per_s):
    """The line printed after each epoch: its last step's losses, the held-out numbers (None without) and the
    speed."""
    line = (f"epoch {epoch + 1}/{config.epochs} step {step}: reconstruction "
            f"{losses.get('Reconstruction Loss', math.nan):.2f}  KL {losses.get('KL Loss', math.nan):.3f}  "
            f"total {losses.get('Total Loss', math.nan):.2f}")
    if evaluation is not None:
        line += (f" | eval -ELBO {evaluation['neg_elbo_nats']:.1f} nats, "
                 f"{evaluation['active_units']}/{evaluation['latent_size']} active units")
    return line + f"  ({images_per_s:.0f} img/s)"


def end_of_run(run, stop):
    """On the main process after the last epoch: samplers of the latent, sample quality, HPARAMS and the projector,
    and the closing lines. Returns the exit code when a stop request interrupted it, else None."""
    try:
        with stop.raising():
            samplers = finish_run(run.config, unwrap(run.eval_model), run.train_images, run.train_classes,
                                  run.eval_images, run.state, run.process.device)
    except Stopped:  # the epochs are saved; a resume does the end of the run again
        run.say(f"\nstopped at the end of the run (fitting the samplers, or measuring FID); its {run.state.epoch} "
                f"epochs are saved. Finish it with: {resume_command(run.run_dir / 'checkpoint.pt')}", file=sys.stderr)
        return stop.exit_code
    run.checkpoints.save(samplers=samplers)
    try:
        log_run_summary(run.writer, run.config, run.state.eval, run.eval_model, run.eval_images, run.eval_labels,
                        run.state.step)
    except OSError as error:  # the run is saved and finished: its projector can be written again on its own
        checkpoint = run.run_dir / "checkpoint.pt"
        held_out = " --holdout-from-checkpoint" if run.config.holdout else ""
        print(f"warning: the projector of the held-out images was not written ({write_failure(error)}); the run "
              f"is saved and finished. Write it with: python vae_inference.py projector --checkpoint "
              f"{shlex.quote(str(checkpoint))}{held_out} --log-dir {shlex.quote(str(run.run_dir / 'projector'))}",
              file=sys.stderr)
    run.say(run_summary(run.run_dir, run.state, time.perf_counter() - run.started, run.config))
    return None


def choose_cpu_threads(config, model, batches, process, say):
    """torch's thread count: --threads, or the faster of 1 thread and all cores over a few training steps (a copy
    of the model takes them, so the run is the same whatever is chosen). Processes of one torchrun share the
    cores, so each takes its share instead."""
    requested = config.threads or (max(1, available_cores() // process.world_size) if process.distributed else 0)
    x = next(iter(batches.epoch(0))).contiguous(memory_format=memory_format(config, batches.device))
    count, timings = choose_threads(training_step_probe(model, x, config), requested)
    say(describe(count, timings, unit_count=len(x)))


def log_epoch(writer, step, epoch, losses, images_per_s, loss_fn, optimization, model, grids):
    """The epoch's training numbers and the image grids of the fixed test batch and prior noise (on the epochs of
    writes_grids). What cannot change
    in this run (a constant KL weight or learning rate, a fixed sigma) is in its settings, not drawn as a flat
    curve."""
    config = optimization.config
    varying = {
        "kl_weight": (config.kl_schedule != "constant", loss_fn.beta),
        "lr": (config.lr_schedule != "constant" or config.lr_warmup_epochs > 0,
               optimization.optimizer.param_groups[0]["lr"]),
        "decoder_sigma": (any(True for _ in unwrap(model).likelihood.parameters()),
                          unwrap(model).likelihood.shared_sigma())}
    log_scalars(writer, step, "train", {
        "epoch": epoch + 1, "images_per_s": images_per_s, "grad_norm": losses["grad_norm"],
        **{name: value for name, (changes, value) in varying.items() if changes}})
    if writes_grids(epoch, config.epochs):
        for name, grid in grids.items():
            writer.add_image(name, grid, step)
    writer.flush()


GRID_FRAMES = 25  # image frames a run writes after its first epochs, whatever its length


def writes_grids(epoch, epochs):
    """Whether epoch (0-based) writes its image grids to TensorBoard: each of the first 5, then one epoch in
    epochs // GRID_FRAMES, and the last. Three grids take about 0.2 MB an epoch, so every epoch of a 500-epoch run
    would write 100 MB of events; this way a run of any length writes about 30 frames of each."""
    every = max(1, epochs // GRID_FRAMES)
    return epoch < 5 or (epoch + 1) % every == 0 or epoch + 1 == epochs


def finish_run(config, model, train_images, train_classes, eval_images, state, device):
    """Samplers of the training images' posteriors (those whose class says so for this config: the GMM, and the
    diffusion prior with --diffusion-prior-steps), so that sampling and variations need no data; with
    --fid-samples, the best one's sample quality joins state.eval. Returns {name: state}. A stop request raises
    Stopped (see StopRequest.raising)."""
    options = fitted_after_training(config)
    samplers = fit_samplers(model, train_images, options, seed=config.seed, hflip=config.hflip, options=options,
                            progress=True, classes=train_classes)
    if config.fid_samples and eval_images is not None:
        best = load_sampler(samplers[next(iter(options))])
        quality = sample_quality(model, best, eval_images, config.fid_samples, 1.0,
                                 torch.Generator().manual_seed(config.seed), device)
        state.eval = {**(state.eval or {}), **quality}
    return samplers


def run_summary(run_dir, state, seconds, config):
    """The lines that end a run: where it is, its best held-out numbers, how long it took, what to run next (on
    checkpoint.pt, which holds the samplers fitted at the end; best.pt has the best held-out weights alone)."""
    lines = [f"done: {state.epoch} epochs, {state.step} steps in {seconds / 60:.1f} min; run folder {run_dir}"]
    if state.eval:
        numbers = [f"-ELBO {state.eval['neg_elbo_nats']:.1f} nats (best {state.best_eval:.1f}, in best.pt)"]
        if state.eval.get("bits_per_dim") is not None:
            numbers.append(f"{state.eval['bits_per_dim']:.3f} bits/dim")
        numbers.append(f"PSNR {state.eval['psnr_db']:.2f} dB")
        if state.eval.get("fid") is not None:
            numbers.append(f"FID {state.eval['fid']:.1f}")
        lines.append("held-out: " + ", ".join(numbers))
    checkpoint = shlex.quote(str(run_dir / "checkpoint.pt"))
    held_out = " --holdout-from-checkpoint" if config.holdout else ""
    lines += [f"  tensorboard --logdir {shlex.quote(str(run_dir.parent))}",
              f"  python vae_inference.py sample --checkpoint {checkpoint}",
              f"  python vae_inference.py evaluate --checkpoint {checkpoint}{held_out}"]
    return "\n".join(lines)


def resume_command(checkpoint_path):
    """The command that continues a run, its path quoted for the shell."""
    return f"python vae_training.py --resume {shlex.quote(str(checkpoint_path))}"


def how_to_fix(error):
    """What the script adds to a library error: the command that resumes a run whose checkpoint was kept."""
    if isinstance(error, ResumableError) and error.checkpoint is not None:
        return f": {resume_command(error.checkpoint)}"
    return ""


def main(argv=None):
    config, args, explicit = parse_args(argv)
    try:
        return train(config, resume=args.resume, explicit=explicit)
    except UserError as error:
        if args.debug:
            raise
        line = f"error: {error}{how_to_fix(error)}"
        # One write with its newline: print() writes the two apart, and under torchrun another process's line
        # could then land between them, gluing two lines into one.
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
        distributed.end_with_error(line, on_every_process=isinstance(error, EveryProcessError))
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted before training started; nothing to save", file=sys.stderr)
        return 130
    finally:
        distributed.teardown()


if __name__ == "__main__":
    vae.quiet_start.loaded()
    sys.exit(main())
