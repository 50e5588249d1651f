"""What a run writes to TensorBoard besides the per-step losses: per-epoch scalars, histograms and image grids.

Per-epoch logs use the global step as their x-axis, like the per-step losses: one axis for every curve, and a
resumed run's purge (at the checkpoint's step) removes whatever a crashed session logged after it.
"""

import contextlib
import dataclasses
import json
import math
import threading

import torch
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams
from torchvision.utils import make_grid

from datasets.batches import to_float
from vae.checkpoint import unwrap
from vae.vae import eval_mode, posterior_means

LOSS_CURVES = ("KL Loss", "Reconstruction Loss", "Total Loss")  # the tutorial's add_scalars("loss", ...)
# The held-out numbers that compare runs in the HPARAMS table, in its column order: TensorBoard shows the first
# five by default (fid only where it was measured).
HPARAM_METRICS = ("neg_elbo_nats", "bits_per_dim", "psnr_db", "fid", "active_units", "kl_nats")
# The settings the HPARAMS table shows first (TensorBoard ticks five by default, in name order: arch, beta,
# epochs, latent, likelihood; lr is the sixth); every other setting is one tick away. "latent" is the latent's
# shape, from --latent-shape or --latent-size.
HPARAM_COLUMNS = ("arch", "beta", "epochs", "latent", "likelihood", "lr")


@contextlib.contextmanager
def writer_thread_errors():
    """Yields a list that collects the exceptions of threads (TensorBoard writes its events from a thread of its
    own) instead of letting Python print their tracebacks; a failed write (a full disk) then ends in the project's
    own line, which the caller writes from the list."""
    failures, previous = [], threading.excepthook
    threading.excepthook = lambda hook: failures.append(hook.exc_value)
    try:
        yield failures
    finally:
        threading.excepthook = previous


def open_writer(run_dir, resumed_step=None):
    """A SummaryWriter for the run folder. When resuming at resumed_step, TensorBoard is told to drop the points
    a crashed session logged after that step, so the resumed curves have each step once."""
    purge_step = None if resumed_step is None else resumed_step + 1
    writer = SummaryWriter(str(run_dir), purge_step=purge_step)
    if purge_step is not None:
        _purge_scalar_curves(writer, "loss", LOSS_CURVES, purge_step)
    return writer


def _purge_scalar_curves(writer, main_tag, names, purge_step):
    """SummaryWriter(purge_step=...) writes its marker into the main run only, but add_scalars gives every curve
    a sub-run of its own (RUN/<main_tag>_<name>/): write the marker there too."""
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


def log_scalars(writer, step, prefix, values):
    """Numbers as scalars, lists as histograms, anything else (None, text) left out."""
    for name, value in values.items():
        if isinstance(value, list):
            writer.add_histogram(f"{prefix}/{name}", torch.tensor(value), step)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            writer.add_scalar(f"{prefix}/{name}", value, step)


@torch.no_grad()
def fixed_grids(model, fixed_images, fixed_noise):
    """{"originals", "reconstructions" (decoded from the posterior mean), "samples" (decoded prior noise)} of the
    same fixed inputs every epoch, so frames compare across epochs: each a grid image for TensorBoard."""
    model = unwrap(model)
    nrow = max(1, int(math.sqrt(len(fixed_images))))
    with eval_mode(model):
        reconstructions = model.decode(model.encode(fixed_images)[0])
        samples = model.decode(fixed_noise)
    return {name: make_grid(images, nrow=nrow) for name, images in
            (("originals", fixed_images), ("reconstructions", reconstructions), ("samples", samples))}


def log_settings(writer, config):
    """The run's settings as text (TEXT tab), so a run's curves and its flags are read in one place."""
    writer.add_text("settings", "```json\n" + json.dumps(dataclasses.asdict(config), indent=2) + "\n```")


def log_hparams(writer, config, metrics):
    """The settings and the final held-out metrics in TensorBoard's HPARAMS table, where runs compare as rows.
    Lists and None (e.g. --latent-shape) become their JSON text, the types HPARAMS takes."""
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    settings = {name: value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
                for name, value in dataclasses.asdict(config).items()}
    settings["latent"] = "x".join(map(str, config.latent_shape)) if config.latent_shape else str(config.latent_size)
    # Every run declares every metric, measured or not: TensorBoard takes the table's columns from the first run
    # it reads, so a run without FID must not hide the FID column of the runs that have one.
    declared = {f"hparams/{name}": 0.0 for name in HPARAM_METRICS}
    experiment, start, end = hparams(settings, declared)
    # TensorBoard shows the settings marked "differs" first. Every run marks the same ones, so that the columns
    # do not depend on which run's declaration TensorBoard happens to read.
    metadata = experiment.value[0].metadata.plugin_data
    data = HParamsPluginData.FromString(metadata.content)
    for info in data.experiment.hparam_infos:
        info.differs = info.name in HPARAM_COLUMNS
    metadata.content = data.SerializeToString()
    file_writer = writer._get_file_writer()
    for summary in (experiment, start, end):
        file_writer.add_summary(summary)
    for name in HPARAM_METRICS:
        if metrics.get(name) is not None:
            writer.add_scalar(f"hparams/{name}", metrics[name])


@torch.no_grad()
def log_projector(writer, model, images_uint8, labels, step, tag="posterior_means"):
    """TensorBoard's PROJECTOR: each image's posterior mean (flattened), its thumbnail (a sprite) and the label of
    its flower class (datasets.folders.class_labels), to see how the latent space arranges the flowers."""
    model = unwrap(model)
    writer.add_embedding(posterior_means(model, images_uint8), metadata=[str(label) for label in labels],
                         label_img=to_float(images_uint8), global_step=step, tag=tag)


def log_run_summary(writer, config, metrics, model, eval_images, labels, step):
    """At the end of a run: HPARAMS with the last held-out metrics, and the PROJECTOR of the held-out images."""
    log_hparams(writer, config, metrics or {})
    if eval_images is not None:
        log_projector(writer, model, eval_images, labels, step)
