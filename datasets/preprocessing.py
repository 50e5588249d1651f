"""Flowers102 images -> uint8 tensors, decoded once into an on-disk cache, served in seeded batches.

The tutorial's pipeline decodes and resizes every full-size JPEG on every epoch, which on a laptop is far
slower than the 32x32 model's training step. Here each image is decoded once (JPEG draft mode to at least
twice the target size, then an antialiased bilinear resize: the same filter torchvision's Resize applies
to PIL images), the result is stored as one uint8 tensor on disk, and batches are cut from it in memory.
"""

import hashlib
import json
import math
import multiprocessing
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from vae.errors import UserError

SPLIT_KEYS = {"train": "trnid", "val": "valid", "test": "tstid"}
RESIZE_METHOD = "jpeg-draft-2x+bilinear-antialias"
CACHE_FORMAT = 1
DOWNLOAD_TIMEOUT_S = 60


# ---------------------------------------------------------------------------------------------- files

def flowers_folder(data_dir):
    return Path(data_dir) / "flowers-102"


def flowers102_urls():
    from torchvision.datasets import Flowers102

    return [Flowers102._download_url_prefix + name for name, _ in Flowers102._file_dict.values()]


def download_flowers102(data_dir, missing="no data"):
    """Download and verify Flowers102 into DATA_DIR/flowers-102 with torchvision.

    torchvision checks a file's md5 only after writing it in place and extracts the archive straight into
    its folder, so a failed or killed download can leave a jpg/ folder and .mat files that look complete.
    Everything therefore lands in DATA_DIR/.flowers-102-download first and moves into flowers-102 only once
    every file has passed its checksum, setid.mat last (its presence is what marks the folder complete).
    Files that fail their checksum are deleted, so the next attempt fetches them again.
    `missing` says what was absent, for the error message.
    """
    from torchvision.datasets import Flowers102

    target = flowers_folder(data_dir)
    staging_root = Path(data_dir) / ".flowers-102-download"
    staged = flowers_folder(staging_root)
    try:
        staging_root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"Flowers102 is not in {target} ({missing}) and {staging_root} cannot be created to "
                        f"download it ({error.strerror}); pass a writable --data-dir") from None
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # offline or a dead mirror fails within a minute, never hangs
    try:
        Flowers102(root=str(staging_root), split="train", download=True)
    except Exception as error:  # urllib, http.client, tarfile and torchvision's checksum error have no common base
        corrupt = _remove_corrupt_downloads(staged)
        for folder in (staged, staging_root):  # keep what a retry can reuse, but leave no empty folders behind
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        reason = (f"checksum mismatch for {', '.join(corrupt)}, deleted" if corrupt
                  else f"{type(error).__name__}: {error}")
        raise UserError(
            f"Flowers102 is not in {target} ({missing}) and could not be downloaded ({reason}). Download "
            f"{' '.join(flowers102_urls())} by hand, extract 102flowers.tgz into {target} (giving "
            f"{target / 'jpg' / 'image_00001.jpg'} ...) and put imagelabels.mat and setid.mat beside jpg/, "
            f"or pass --data-dir pointing at a folder that holds flowers-102/") from None
    finally:
        socket.setdefaulttimeout(previous_timeout)
    _move_into_place(staged, target)
    shutil.rmtree(staging_root, ignore_errors=True)  # the verified archive is no longer needed


def _remove_corrupt_downloads(folder):
    """Delete downloaded files whose md5 is not torchvision's; returns their names."""
    from torchvision.datasets import Flowers102
    from torchvision.datasets.utils import check_integrity

    corrupt = []
    for name, md5 in Flowers102._file_dict.values():
        path = Path(folder) / name
        if path.is_file() and not check_integrity(str(path), md5):
            path.unlink()
            corrupt.append(name)
    return corrupt


def _move_into_place(staged, target):
    (target / "jpg").mkdir(parents=True, exist_ok=True)
    for image in (staged / "jpg").iterdir():
        os.replace(image, target / "jpg" / image.name)
    for name in ("imagelabels.mat", "setid.mat"):
        os.replace(staged / name, target / name)


def flowers102_files(data_dir, split, download=True):
    """The image files of a Flowers102 split, in the official order (setid.mat), downloading if absent."""
    if split not in SPLIT_KEYS:
        raise UserError(f"unknown split {split!r}; use one of {', '.join(SPLIT_KEYS)}")
    folder = flowers_folder(data_dir)
    setid_path = folder / "setid.mat"
    absent = [name for name, present in (("setid.mat", setid_path.is_file()), ("jpg/", (folder / "jpg").is_dir()))
              if not present]
    if absent:
        missing = f"no {' and no '.join(absent)} there"
        if not download:
            raise UserError(f"no Flowers102 data in {folder} ({missing}); place setid.mat and jpg/ there or pass "
                            f"--data-dir pointing at a folder that holds flowers-102/")
        download_flowers102(data_dir, missing)
    from scipy.io import loadmat

    try:
        ids = loadmat(setid_path, squeeze_me=True)[SPLIT_KEYS[split]]
    except Exception as error:  # scipy raises several types for a damaged or foreign .mat file
        raise UserError(f"cannot read the split {split!r} from {setid_path} ({type(error).__name__}: {error}); "
                        f"replace it with Flowers102's official setid.mat") from None
    files = [folder / "jpg" / f"image_{int(i):05d}.jpg" for i in np.atleast_1d(ids)]
    if not files:
        raise UserError(f"the {split!r} split in {setid_path} lists no images; replace it with Flowers102's "
                        f"official setid.mat or choose another split")
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise UserError(f"{len(missing)} of the {len(files)} images of the {split!r} split are missing, e.g. "
                        f"{missing[0]}; re-extract 102flowers.tgz into {folder}, or train/evaluate on a split "
                        f"that is complete (--split, --eval-split, --holdout)")
    return files


# --------------------------------------------------------------------------------------------- images

def load_image(path, resolution):
    """Decode an image file (any size; JPEG, PNG, ...; RGBA and greyscale too) to a uint8 (3, H, W) tensor.

    This is the preprocessing of training, so a user's photo is seen exactly as the training images were.
    """
    height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
    try:
        with Image.open(path) as image:
            image.draft("RGB", (2 * width, 2 * height))  # JPEG only: decode at a reduced scale, >= 2x target
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                rgba = image.convert("RGBA")
                image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
            image = image.convert("RGB").resize((width, height), Image.BILINEAR)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise UserError(f"cannot read image {path}: {error}. Replace or delete the file") from None
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def _load_or_none(job):
    path, resolution, skip_bad = job
    try:
        return load_image(path, resolution)
    except UserError:
        if skip_bad:
            return None
        raise


def decode_images(files, resolution, num_workers=1, skip_bad_images=False, description="decoding"):
    """Decode files in parallel into a uint8 tensor (N, 3, H, W); returns (images, files kept)."""
    jobs = [(f, resolution, skip_bad_images) for f in files]
    progress = dict(total=len(jobs), desc=description, unit="img", leave=False)
    if num_workers > 1 and len(jobs) > 64:
        with multiprocessing.get_context("fork").Pool(num_workers) as pool:
            decoded = list(tqdm(pool.imap(_load_or_none, jobs, chunksize=16), **progress))
    else:
        decoded = [_load_or_none(job) for job in tqdm(jobs, **progress)]
    kept = [(f, image) for f, image in zip(files, decoded) if image is not None]
    if not kept:
        raise UserError(f"none of the {len(files)} images could be read, e.g. {files[0]}")
    return torch.stack([image for _, image in kept]), [f for f, _ in kept]


# ---------------------------------------------------------------------------------------------- cache

def default_cache_dir():
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vae-flowers"


def cache_key(split, resolution, files, skip_bad_images=False):
    """Changes whenever the split, resolution, resize method or any file (name, size, mtime) changes."""
    stats = [(Path(f).name, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    payload = json.dumps([CACHE_FORMAT, split, resolution, RESIZE_METHOD, skip_bad_images, stats])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def cache_path(data_dir, split, resolution, files, cache_dir="", skip_bad_images=False):
    """Next to the data when that folder is writable, else in cache_dir (default ~/.cache/vae-flowers)."""
    folder = flowers_folder(data_dir) / "cache"
    if not os.access(folder if folder.exists() else folder.parent, os.W_OK):
        folder = Path(cache_dir) if cache_dir else default_cache_dir()
    key = cache_key(split, resolution, files, skip_bad_images)
    return folder / f"flowers102-{split}-{resolution}px-{key}.pt"


def cached_images(data_dir, split, resolution, cache_dir="", num_workers=1, skip_bad_images=False):
    """The split as a uint8 tensor (N, 3, R, R), decoded once and then loaded from the on-disk cache."""
    files = flowers102_files(data_dir, split)
    path = cache_path(data_dir, split, resolution, files, cache_dir, skip_bad_images)
    if path.is_file():
        try:
            return torch.load(path, weights_only=True)["images"]
        except Exception:  # an unreadable cache is rebuilt, never trusted
            pass
    images, kept = decode_images(files, resolution, num_workers, skip_bad_images,
                                 description=f"caching {split} {resolution}px")
    if len(kept) < len(files):
        print(f"skipped {len(files) - len(kept)} unreadable image(s) of the {split!r} split")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save({"images": images, "files": [f.name for f in kept]}, temporary)
    os.replace(temporary, path)
    return images


# -------------------------------------------------------------------------------------------- batches

def holdout_split(num_images, fraction, seed):
    """Seeded (train indices, held-out indices) with round(fraction * num_images) held out."""
    if not 0 <= fraction < 1:
        raise UserError(f"--holdout must be in [0, 1), got {fraction}")
    permutation = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))
    held_out = max(1, round(fraction * num_images)) if fraction > 0 else 0
    return permutation[held_out:].sort().values, permutation[:held_out].sort().values


def to_float(batch_uint8):
    """uint8 [0, 255] -> float [0, 1], done on whatever device the batch is on."""
    return batch_uint8.float().div_(255)


class ImageBatches:
    """Seeded, reshuffled-per-epoch batches of a uint8 image tensor, delivered as floats on `device`.

    The order of epoch e depends only on (seed, e), so a resumed run sees the batches it would have seen.
    With rank/world_size each process takes its own shard of every epoch's permutation.
    """

    def __init__(self, images, batch_size, device, shuffle=True, seed=0, rank=0, world_size=1):
        # On a GPU the whole uint8 set (100 MB for 8,189 images at 64x64) lives there: no copy per batch.
        self.images = images.to(device) if torch.device(device).type == "cuda" else images
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size

    def indices(self, epoch):
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(len(self.images), generator=generator)
        else:
            order = torch.arange(len(self.images))
        return order[self.rank::self.world_size]

    def __len__(self):
        return math.ceil(len(self.indices(0)) / self.batch_size)

    def epoch(self, epoch, start_batch=0):
        order = self.indices(epoch)
        for start in range(start_batch * self.batch_size, len(order), self.batch_size):
            batch = self.images[order[start:start + self.batch_size]]
            yield to_float(batch.to(self.device, non_blocking=True))
