"""Training throughput (images/s) of the tutorial's data pipeline, of this project's, and of the model step alone.

    python benchmarks/throughput.py --data-dir DATA_DIR
    python benchmarks/throughput.py --data-dir DATA_DIR --replicate 8189 --cache-only
    python benchmarks/throughput.py --data-dir DATA_DIR --resolution 64 --replicate 8189 \\
        --cache-only

Every measurement runs the same training step (the default VAE, ELBOLoss(beta=0.1), one Adam step at lr 1e-4)
on batches of the same images:
  tutorial  torchvision.datasets.Flowers102 + Resize((R, R)) + ToTensor + DataLoader(shuffle=True), which decodes
            and resizes every full-size JPEG of every epoch in --seed-workers processes (default: one per core);
  project   cached_images (decoded once, into a temporary cache folder, then loaded) + ImageBatches;
  compute   one batch reused for every step: the ceiling no data pipeline can beat.
compute and project alternate step by step; the tutorial's pipeline (whose workers decode ahead in the background)
runs on its own; each turn is limited to --steps steps or --seconds seconds, and the best of --rounds rounds is
reported, which damps interference from other processes on the same cores. The last line printed is one JSON object.
"""

import argparse
import itertools
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.io import loadmat, savemat

# Run as a script from anywhere: the project's packages live one folder up.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datasets.batches import ImageBatches  # noqa: E402
from datasets.cache import cache_path, cached_images  # noqa: E402
from datasets.flowers102 import SPLIT_KEYS, flowers102_files  # noqa: E402
from vae.losses import ELBOLoss  # noqa: E402
from vae.device import pick_device  # noqa: E402
from vae.threads import available_cores  # noqa: E402
from vae.vae import VAE  # noqa: E402


def parse_args(argv=None):
    cores = available_cores()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-dir", default="datasets", help="Flowers102 root (holding flowers-102/)")
    parser.add_argument("--split", default="train", choices=tuple(SPLIT_KEYS), help="split whose images are used")
    parser.add_argument("--resolution", type=int, default=32, help="images are resized to RESOLUTION x RESOLUTION")
    parser.add_argument("--batch-size", type=int, default=64, help="images per training step")
    parser.add_argument("--steps", type=int, default=50, help="at most this many timed steps per measurement "
                        "and round")
    parser.add_argument("--seconds", type=float, default=5.0, help="at most this many seconds per measurement "
                        "and round")
    parser.add_argument("--rounds", type=int, default=5, help="measure every pipeline this many times, "
                        "interleaved in short turns; report the best (other processes on the cores slow "
                        "some turns down)")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed steps before each measurement")
    parser.add_argument("--seed-workers", type=int, default=cores, help="DataLoader worker processes of the "
                        "tutorial pipeline (default: the cores available)")
    parser.add_argument("--num-workers", type=int, default=cores, help="processes decoding JPEGs while the "
                        "cache is built")
    parser.add_argument("--replicate", type=int, default=0, help="benchmark a temporary Flowers102 root whose "
                        "splits list this many images, symbolic links cycling through the split's real JPEGs "
                        "(8189 = the whole data set); 0 = the data as it is")
    parser.add_argument("--full-epoch", action="store_true", help="also time one complete epoch of each "
                        "pipeline (DataLoader start-up included)")
    parser.add_argument("--cache-only", action="store_true", help="build the cache from scratch, load it once, "
                        "print the cache figures and stop")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads of the model step (0: "
                        "torch's default, one per core). On cores shared with other busy processes, 1 avoids "
                        "the stalls of threads waiting for each other")
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda", "mps"), help="where the model runs")
    return parser.parse_args(argv)


def replicated_root(data_dir, split, count, folder):
    """A Flowers102 root in `folder` whose three splits all list `count` images: symbolic links that cycle
    through the split's real JPEGs. Returns its path."""
    sources = flowers102_files(data_dir, split, download=False)
    labels = loadmat(Path(data_dir) / "flowers-102" / "imagelabels.mat", squeeze_me=True)["labels"]
    target = Path(folder) / "flowers-102"
    (target / "jpg").mkdir(parents=True)
    new_labels = []
    for new_id in range(1, count + 1):
        source = sources[(new_id - 1) % len(sources)]
        (target / "jpg" / f"image_{new_id:05d}.jpg").symlink_to(source.resolve())
        new_labels.append(labels[int(source.stem.split("_")[1]) - 1])
    ids = np.arange(1, count + 1)
    savemat(target / "setid.mat", {"trnid": ids, "valid": ids, "tstid": ids})
    savemat(target / "imagelabels.mat", {"labels": np.array(new_labels)})
    return Path(folder)


def tutorial_loader(data_dir, split, resolution, batch_size, workers):
    """The tutorial's pipeline: torchvision's Flowers102 dataset, Resize + ToTensor, a shuffling DataLoader.

    Only torchvision's md5 check of the two .mat files is skipped (once, at construction), so that the pipeline
    also runs on generated roots with their own setid.mat; the per-image work is torchvision's, unchanged.
    """
    from torchvision import transforms
    from torchvision.datasets import Flowers102

    class Flowers102AnySetid(Flowers102):
        def _check_integrity(self):
            return self._images_folder.is_dir()

    transform = transforms.Compose([transforms.Resize((resolution, resolution)), transforms.ToTensor()])
    dataset = Flowers102AnySetid(root=str(data_dir), split=split, transform=transform)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers)


def training_step(resolution, device):
    """A fresh default VAE with ELBOLoss(beta=0.1) and Adam(lr=1e-4); returns step(x) -> total loss (float)."""
    torch.manual_seed(0)
    model = VAE((resolution, resolution)).to(device)
    loss_fn = ELBOLoss(beta=0.1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step(x):
        _, _, _, total = loss_fn(x, *model(x))
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        return total.item()  # as the training loop does: waits for the device, so the timing is honest

    return step


def endless(epochs):
    """Batches of epoch 0, 1, 2, ... from epochs(e), an iterable per epoch; the tutorial's DataLoader restarts
    its workers every epoch, as it does in training."""
    epoch = 0
    while True:
        yield from epochs(epoch)
        epoch += 1


def images_per_second(feeds, max_steps, max_seconds, warmup_steps):
    """Images/s of each feed, a dict name -> (batch iterator, step function).

    After warmup_steps untimed steps each, the feeds take turns one step at a time, each step (batch fetch
    included) timed on its own, until max_steps steps each or max_seconds in all. Taking turns step by step
    exposes every feed to the same interference from other processes, so their ratio holds even on busy cores.
    """
    for batches, step in feeds.values():
        for _ in range(warmup_steps):
            step(next(batches))
    images = dict.fromkeys(feeds, 0)
    seconds = dict.fromkeys(feeds, 0.0)
    started = time.perf_counter()
    for _ in range(max_steps):
        for name, (batches, step) in feeds.items():
            begun = time.perf_counter()
            x = next(batches)
            step(x)
            seconds[name] += time.perf_counter() - begun
            images[name] += len(x)
        if time.perf_counter() - started > max_seconds:
            break
    return {name: images[name] / seconds[name] for name in feeds}


def epoch_seconds(batches, step):
    """Wall time (s) of one complete epoch over the iterable `batches`, start-up included."""
    started = time.perf_counter()
    for x in batches:
        step(x)
    return time.perf_counter() - started


def build_and_load_cache(data_dir, split, resolution, num_workers, cache_dir):
    """(images, figures): the cache built from scratch in cache_dir, then loaded again, timed (s) and sized."""
    started = time.perf_counter()
    cached_images(data_dir, split, resolution, cache_dir=cache_dir, num_workers=num_workers, next_to_data=False)
    build_s = time.perf_counter() - started
    started = time.perf_counter()
    images = cached_images(data_dir, split, resolution, cache_dir=cache_dir, num_workers=num_workers,
                           next_to_data=False)
    load_s = time.perf_counter() - started
    path = cache_path(data_dir, split, resolution, flowers102_files(data_dir, split, download=False), cache_dir,
                      next_to_data=False)
    return images, {"num_images": len(images), "cache_build_s": build_s, "cache_load_s": load_s,
                    "cache_file_bytes": path.stat().st_size, "cache_tensor_bytes": images.nbytes}


def benchmark(args, data_dir, cache_dir):
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    images, figures = build_and_load_cache(data_dir, args.split, args.resolution, args.num_workers, cache_dir)
    print(f"cache of {figures['num_images']} images at {args.resolution}x{args.resolution}: built in "
          f"{figures['cache_build_s']:.2f} s ({args.num_workers} processes), loaded in "
          f"{figures['cache_load_s']:.3f} s; file {figures['cache_file_bytes'] / 1e6:.1f} MB, "
          f"tensor {figures['cache_tensor_bytes'] / 1e6:.1f} MB (uint8)")
    if args.cache_only:
        return figures

    project = ImageBatches(images, args.batch_size, device, shuffle=True, seed=0)
    tutorial = tutorial_loader(data_dir, args.split, args.resolution, args.batch_size, args.seed_workers)
    fixed = next(project.epoch(0))
    # The tutorial's DataLoader workers decode ahead in the background, so it runs in turns of its own; compute
    # and project share the main process and alternate step by step.
    rates = {"compute": 0.0, "project": 0.0, "seed": 0.0}
    for round_ in range(args.rounds):
        shared_turn = images_per_second(
            {"compute": (itertools.repeat(fixed), training_step(args.resolution, device)),
             "project": (endless(project.epoch), training_step(args.resolution, device))},
            args.steps, args.seconds, args.warmup_steps)
        seed_batches = (x.to(device) for x in endless(lambda epoch: (x for x, _ in tutorial)))
        seed_turn = images_per_second({"seed": (seed_batches, training_step(args.resolution, device))},
                                      args.steps, args.seconds, args.warmup_steps)
        del seed_batches  # stops this turn's DataLoader workers before the next turn
        for name, rate in {**shared_turn, **seed_turn}.items():
            rates[name] = max(rates[name], rate)
        print(f"round {round_ + 1}/{args.rounds}: " + "  ".join(f"{name} {rate:.0f}"
                                                              for name, rate in {**shared_turn, **seed_turn}.items())
              + " img/s")
    figures.update(seed_img_s=rates["seed"], project_img_s=rates["project"], compute_img_s=rates["compute"],
                   seed_workers=args.seed_workers, cores=available_cores(), threads=torch.get_num_threads(),
                   batch_size=args.batch_size,
                   resolution=args.resolution, device=str(device))
    if args.full_epoch:
        project_s, seed_s = [], []
        for epoch in range(min(args.rounds, 3)):
            project_s.append(epoch_seconds(project.epoch(epoch), training_step(args.resolution, device)))
            seed_s.append(epoch_seconds((x.to(device) for x, _ in tutorial), training_step(args.resolution, device)))
        figures.update(project_epoch_s=min(project_s), seed_epoch_s=min(seed_s))
    return figures


def print_table(figures, args):
    rows = [("tutorial: Flowers102 + Resize + ToTensor + DataLoader", figures["seed_img_s"],
             f"{figures['seed_workers']} workers"),
            ("project: cached_images + ImageBatches", figures["project_img_s"], "cache in memory"),
            ("compute only: one batch reused", figures["compute_img_s"], "ceiling")]
    print(f"\n{figures['num_images']} images, {args.resolution}x{args.resolution}, batch {args.batch_size}, "
          f"{figures['device']}, {figures['cores']} cores, {figures['threads']} torch threads; "
          f"best of {args.rounds} rounds")
    print(f"{'pipeline':55s} {'img/s':>8s}  {'vs compute':>10s}  note")
    for name, rate, note in rows:
        print(f"{name:55s} {rate:8.0f}  {rate / figures['compute_img_s']:10.2f}  {note}")
    print(f"project / tutorial: {figures['project_img_s'] / figures['seed_img_s']:.1f}x")
    if "seed_epoch_s" in figures:
        print(f"one epoch of {figures['num_images']} images: project {figures['project_epoch_s']:.2f} s, tutorial "
              f"{figures['seed_epoch_s']:.2f} s (x 500 epochs: {500 * figures['project_epoch_s'] / 60:.1f} min vs "
              f"{500 * figures['seed_epoch_s'] / 60:.1f} min)")


def main(argv=None):
    args = parse_args(argv)
    workspace = Path(tempfile.mkdtemp(prefix="vae-throughput-"))
    try:
        data_dir = Path(args.data_dir)
        if args.replicate:
            data_dir = replicated_root(data_dir, args.split, args.replicate, workspace / "root")
        figures = benchmark(args, data_dir, cache_dir=workspace / "cache")
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
    if not args.cache_only:
        print_table(figures, args)
    print(json.dumps({name: round(value, 4) if isinstance(value, float) else value
                      for name, value in figures.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
