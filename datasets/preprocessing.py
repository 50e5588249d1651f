"""Images -> uint8 tensors, decoded once into an on-disk cache, served in seeded batches.

A data set is a Flowers102 root (DATA_DIR/flowers-102 in torchvision's layout, with its train, val and test
splits) or any folder of images: flat, or one sub-folder per class (torchvision's ImageFolder layout), whose one
split is all of it ("all"; --holdout carves an evaluation set out of it).

Non-square photos are resized to the square in one of two ways, the same in training and inference: "squash" (the
tutorial's Resize((R, R)): the whole photo, its aspect ratio lost) or "center-crop" (the largest centred square,
then resized: the aspect ratio kept, the sides lost).

The tutorial's pipeline decodes and resizes every full-size JPEG on every epoch, which on a laptop is far
slower than the 32x32 model's training step. Here each image is decoded once (JPEG draft mode to at least
twice the target size, then an antialiased bilinear resize: the same filter torchvision's Resize applies
to PIL images), the result is stored as one uint8 tensor on disk, and batches are cut from it in memory.

Every mode Pillow opens is decoded as an image viewer shows it (16-bit greyscale scaled, not clipped to white;
transparency composited on white; CMYK, palette and 1-bit converted); modes with no agreed meaning are refused
by name. Training (the cache, decode_images) does not apply the EXIF orientation tag: it follows the tutorial's
decoding, torchvision's Flowers102 loader (`Image.open(f).convert("RGB")`), and Flowers102's JPEGs carry no
EXIF data at all (none of the 2,040 train and val files has an APP1 segment), so the result is the same.
Inference (load_image) applies it, so a phone photo is used upright.
"""

import contextlib
import hashlib
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import socket
import struct
import sys
import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from vae.errors import UserError

SPLIT_KEYS = {"train": "trnid", "val": "valid", "test": "tstid"}
FOLDER_SPLIT = "all"  # a folder of images has one split: all of it
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
RESIZES = ("squash", "center-crop")
RESIZE_METHOD = "jpeg-draft-2x+bilinear-antialias"
CACHE_FORMAT = 3  # bumped whenever the cached payload changes, so old files are rebuilt (3: checksum)
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
    ids = np.atleast_1d(np.squeeze(ids))
    if ids.ndim != 1 or ids.dtype.kind not in "iuf" or (ids.dtype.kind == "f" and not np.all(ids == np.round(ids))):
        raise UserError(f"the split {split!r} in {setid_path} is not a list of image numbers ({ids.dtype}, shape "
                        f"{ids.shape}); replace it with Flowers102's official setid.mat")
    files = [folder / "jpg" / f"image_{int(i):05d}.jpg" for i in ids]
    if not files:
        raise UserError(f"the {split!r} split in {setid_path} lists no images; replace it with Flowers102's "
                        f"official setid.mat or choose another split")
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise UserError(f"{len(missing)} of the {len(files)} images of the {split!r} split are missing, e.g. "
                        f"{missing[0]}; re-extract 102flowers.tgz into {folder}, or train/evaluate on a split "
                        f"that is complete (--split, --eval-split, --holdout)")
    return files


def is_image_folder(data_dir):
    """Whether data_dir is a folder of images (flat, or one sub-folder per class) rather than a Flowers102 root."""
    root = Path(data_dir)
    return root.is_dir() and not flowers_folder(root).exists() and bool(folder_files(root))


def folder_files(data_dir):
    """The image files of a folder, sorted: those at its top level and those of its sub-folders (one per class).
    Hidden files and folders (the image cache's .vae-cache among them) are left out."""
    root = Path(data_dir)

    def images_in(folder):
        return [f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")
                and f.is_file()]
    files = images_in(root)
    for folder in root.iterdir():
        if folder.is_dir() and not folder.name.startswith("."):
            files += images_in(folder)
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def dataset_files(data_dir, split, download=True):
    """The image files of a split: a Flowers102 split, or every image of a folder (whose only split is "all")."""
    if is_image_folder(data_dir):
        return folder_files(data_dir)
    return flowers102_files(data_dir, split, download)


def image_name(data_dir, path):
    """How an image is named in names lists: its file name in Flowers102, its path inside a folder data set."""
    return Path(path).relative_to(data_dir).as_posix() if is_image_folder(data_dir) else Path(path).name


# --------------------------------------------------------------------------------------------- images

def _height_width(resolution):
    return (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)


# Modes that hold one 16-bit (or wider) grey channel: PNG and TIFF 16-bit greyscale open as one of them.
SIXTEEN_BIT_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")
WITH_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")
EXIF_ORIENTATION = 0x0112  # the tag's number in the EXIF standard
# What Pillow raises for a file it cannot decode: not an image, truncated, damaged (OSError covers
# UnidentifiedImageError, a missing file and a directory), a mode it cannot convert (ValueError), or too many pixels.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)


class _UnsupportedMode(Exception):
    """An image whose pixels have no agreed 8-bit RGB meaning; the message says why and what to save instead."""


def _as_rgb(image):
    """An opened image of any mode as 8-bit RGB, the way an image viewer shows it."""
    if image.mode == "F":
        # Floating-point pixels (scientific TIFFs, depth maps) may span 0..1, 0..255 or anything: guessing would
        # silently train on a wrong picture.
        raise _UnsupportedMode("its pixels are 32-bit floats (mode F), which have no agreed brightness range. "
                               "Save it as an 8- or 16-bit PNG or a JPEG")
    if image.mode in SIXTEEN_BIT_GREY:
        # convert("RGB") clips every value above 255, so a 16-bit greyscale image would come out solid white;
        # scale 0..65535 to 0..255 instead (mode "I" holds 16-bit PNGs in older Pillows; wider values are clipped).
        grey = np.asarray(image).astype(np.float32) / 257
        image = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8))
    if image.mode in WITH_ALPHA or "transparency" in image.info:
        # Transparent pixels would otherwise show whatever colour happens to be stored under them (often black);
        # a viewer shows them on its background, taken to be white here. Palette and single-colour transparency
        # (PNG tRNS, GIF) arrive in image.info and are applied by convert("RGBA").
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    # 1-bit, grey, palette, CMYK (Pillow undoes the inverted CMYK of Adobe JPEGs), YCbCr, LAB, HSV: Pillow's own
    # conversions. Modes it cannot convert raise ValueError, reported with the mode's name.
    return image.convert("RGB")


def decode_rgb(path, resolution, exif_orientation=False, resize="squash"):
    """Decode an image file to a uint8 numpy array (H, W, 3): JPEG draft, then antialiased bilinear resize of the
    whole image ("squash") or of its largest centred square ("center-crop").

    exif_orientation=True turns the image upright as its EXIF tag says (phone photos); training leaves it off,
    as the tutorial's decoding does. Raises UserError naming the file when it cannot be decoded.
    """
    height, width = _height_width(resolution)
    try:
        with Image.open(path) as image:
            turned = exif_orientation and image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
            # JPEG only (a no-op otherwise): let libjpeg decode at 1/2, 1/4 or 1/8 scale, never below twice the
            # target, so the antialiased resize still sees enough pixels and the result stays within about
            # 1/255 of resizing the full-size image, at a fraction of the decoding time. A quarter turn to come
            # swaps which stored side becomes the width.
            image.draft("RGB", (2 * height, 2 * width) if turned else (2 * width, 2 * height))
            if exif_orientation:
                image = ImageOps.exif_transpose(image)
            if resize == "center-crop":
                image = _center_square(image, width / height)
            # PIL's bilinear resize widens its kernel when shrinking (antialiasing), as torchvision's Resize does.
            image = _as_rgb(image).resize((width, height), Image.BILINEAR)
            return np.array(image)  # a writable copy, which torch.from_numpy expects
    except _UnsupportedMode as error:
        raise UserError(f"cannot read image {path}: {error}") from None
    except DECODE_ERRORS as error:
        # An OSError's strerror ("Is a directory") is shorter than its str(), which repeats the path.
        lines = (getattr(error, "strerror", None) or str(error)).strip().splitlines()
        reason = lines[0] if lines else type(error).__name__
        raise UserError(f"cannot read image {path}: {reason}. Replace or delete the file") from None


def _center_square(image, aspect):
    """The largest centred crop of the given width / height aspect (1 for a square)."""
    width, height = image.size
    crop_width, crop_height = (round(height * aspect), height) if width / height > aspect else \
        (width, round(width / aspect))
    left, top = (width - crop_width) // 2, (height - crop_height) // 2
    return image.crop((left, top, left + crop_width, top + crop_height))


def load_image(path, resolution, exif_orientation=True, resize="squash"):
    """Decode an image file (any size; JPEG, PNG, ...; RGBA and greyscale too) to a uint8 (3, H, W) tensor.

    This is the preprocessing of training, so a user's photo is seen exactly as the training images were, except
    that the photo is first turned upright as its EXIF orientation tag says (training images are not; see the
    module's docstring).
    """
    return torch.from_numpy(decode_rgb(path, resolution, exif_orientation, resize)).permute(2, 0, 1)


def _decode_or_none(job):
    # Runs in the worker processes. It returns a numpy array, not a tensor: torch would send a tensor between
    # processes through a shared-memory segment per image, which costs more than decoding a 32x32 image.
    path, resolution, skip_bad, resize = job
    try:
        return decode_rgb(path, resolution, resize=resize)
    except UserError:
        if skip_bad:
            return None
        raise


def _pool_context():
    # fork starts workers in milliseconds and they inherit the imports; spawn is the fallback where there is
    # no fork (Windows).
    return multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")


def _worker_signals():
    """Pool initializer. Ctrl-C in a terminal sends SIGINT to every process of the group; the workers ignore it, so
    only the main process raises KeyboardInterrupt (and ends them) instead of each worker printing a traceback.
    SIGTERM gets its default back (a fork inherits the main process's handler), so Pool.terminate() ends a worker
    at once and silently."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """While the pool runs, SIGTERM (kill, a job scheduler) raises KeyboardInterrupt in the main process as Ctrl-C
    does, so the pool is terminated on the way out. By default SIGTERM would end only this process, and each
    orphaned worker would later die on a broken pipe with a traceback. A handler the program set is kept."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def decode_images(files, resolution, num_workers=1, skip_bad_images=False, description="decoding", resize="squash"):
    """Decode files (in num_workers processes) into a uint8 tensor (N, 3, H, W); returns (images, files kept).

    Unreadable files raise UserError naming the file, or are left out with skip_bad_images. Ctrl-C or SIGTERM
    ends the workers and raises KeyboardInterrupt in the calling process only.
    """
    jobs = [(f, resolution, skip_bad_images, resize) for f in files]
    progress = dict(total=len(jobs), desc=description, unit="img", leave=False)
    num_workers = max(1, min(num_workers, len(jobs) // 64))  # a pool does not pay for itself on a few images
    # The bar is closed before an error about a bad image is printed, so that message gets a line of its own.
    with tqdm(**progress) as bar, contextlib.ExitStack() as stack:
        if num_workers > 1:
            # Large chunks keep the inter-process traffic low; about 8 chunks per worker still balances the load
            # and lets the progress bar move.
            chunksize = max(1, min(256, len(jobs) // (8 * num_workers)))
            stack.enter_context(_sigterm_as_interrupt())
            # Leaving the with block (done, an error, KeyboardInterrupt) calls pool.terminate(), which also waits
            # for the workers to exit, so none outlives the build.
            pool = stack.enter_context(_pool_context().Pool(num_workers, initializer=_worker_signals))
            results = pool.imap(_decode_or_none, jobs, chunksize=chunksize)
        else:
            results = map(_decode_or_none, jobs)
        decoded = []
        for image in results:
            decoded.append(image)
            bar.update()
    kept = [i for i, image in enumerate(decoded) if image is not None]
    if not kept:
        raise UserError(f"none of the {len(files)} images could be read, e.g. {files[0]}")
    height, width = _height_width(resolution)
    images = torch.empty((len(kept), 3, height, width), dtype=torch.uint8)
    for row, i in enumerate(kept):
        images[row] = torch.from_numpy(decoded[i]).permute(2, 0, 1)
    return images, [files[i] for i in kept]


# ---------------------------------------------------------------------------------------------- cache

def default_cache_dir():
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vae-flowers"


def cache_key(split, resolution, files, resize="squash"):
    """16 hex digits that change whenever the split, resolution, resize method or any file (its name, size in
    bytes or modification time in ns) changes. One cache serves runs with and without --skip-bad-images (see
    cached_images)."""
    stats = []
    for f in files:  # os.path, not pathlib: building 8,189 Path objects would take longer than loading the cache
        stat = os.stat(f)
        stats.append((os.path.basename(f), stat.st_size, stat.st_mtime_ns))
    method = RESIZE_METHOD if resize == "squash" else f"{RESIZE_METHOD}+{resize}"  # squash keeps the older keys
    payload = json.dumps([CACHE_FORMAT, split, resolution, method, False, stats])  # False: the older keys
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _may_write(folder):
    """Whether files may be created in folder. A folder without any write-permission bit counts as read-only
    even for root (whom os.access lets write anywhere), so a data set marked read-only is never written into."""
    try:
        return os.access(folder, os.W_OK) and bool(os.stat(folder).st_mode & 0o222)
    except OSError:
        return False


def images_folder(data_dir):
    """The folder that holds the images: DATA_DIR/flowers-102, or DATA_DIR itself for a folder of images."""
    return Path(data_dir) if is_image_folder(data_dir) else flowers_folder(data_dir)


def inside_images_folder(data_dir, path):
    """Whether path is the folder that holds data_dir's images, or lies inside it."""
    folder, path = images_folder(data_dir).resolve(), Path(path).resolve()
    return path == folder or folder in path.parents


def _cache_prefix(data_dir, split, resolution, in_shared_folder, resize="squash"):
    size = "x".join(map(str, _height_width(resolution)))
    kind = "images" if is_image_folder(data_dir) else "flowers102"
    prefix = f"{kind}-{split}-{size}px" + ("" if resize == "squash" else f"-{resize}")
    if in_shared_folder:
        # One cache folder serves every data root that is not writable; the root's own id keeps their caches
        # apart, so refreshing one root's cache never evicts another's.
        root = str(images_folder(data_dir).resolve())
        prefix += "-" + hashlib.sha256(root.encode()).hexdigest()[:8]
    return prefix


def _cache_locations(data_dir, split, resolution, key, cache_dir="", next_to_data=True, resize="squash"):
    """(paths to look for the cache in, paths to write it to), each in order of preference."""
    shared_folder = Path(cache_dir) if cache_dir else default_cache_dir()
    in_shared = shared_folder / f"{_cache_prefix(data_dir, split, resolution, True, resize)}-{key}.pt"
    if not next_to_data:
        return [in_shared], [in_shared]
    data_folder = images_folder(data_dir)
    # In a folder of images, a hidden folder: a sub-folder named cache would read as a class of images.
    cache_folder = data_folder / (".vae-cache" if is_image_folder(data_dir) else "cache")
    beside = cache_folder / f"{_cache_prefix(data_dir, split, resolution, False, resize)}-{key}.pt"
    writable = _may_write(data_folder) and (not beside.parent.exists() or _may_write(beside.parent))
    return [beside, in_shared], ([beside] if writable else []) + [in_shared]


def cache_path(data_dir, split, resolution, files, cache_dir="", next_to_data=True, resize="squash"):
    """Where the cache of these files is written: DATA_DIR/flowers-102/cache/ (DATA_DIR/.vae-cache/ for a folder
    of images) when the data folder is writable, else cache_dir (default ~/.cache/vae-flowers). next_to_data=False
    always picks cache_dir."""
    key = cache_key(split, resolution, files, resize)
    return _cache_locations(data_dir, split, resolution, key, cache_dir, next_to_data, resize)[1][0]


def images_checksum(images):
    """A hex digest of a uint8 image tensor's bytes. torch.load checks a file's structure, not its contents: a
    flipped bit on disk would otherwise be trained on without a word. SHA-256 has CPU instructions on most
    machines: about 0.1 s for the 100 MB of 8,189 images at 64x64, far less than decoding them."""
    return hashlib.sha256(images.contiguous().numpy()).hexdigest()


def _read_cache(path, key, resolution):
    """(cached uint8 images (N, 3, H, W), the names of their files), or None when path is missing, damaged or holds
    another cache."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, weights_only=True)
    except Exception:  # torch.load raises many types for a truncated or foreign file; such a cache is rebuilt
        print(f"the image cache {path} is damaged; rebuilding it", file=sys.stderr)
        return None
    images = payload.get("images") if isinstance(payload, dict) else None
    if (not isinstance(payload, dict) or payload.get("key") != key or not isinstance(images, torch.Tensor)
            or images.dtype != torch.uint8 or tuple(images.shape[1:]) != (3, *_height_width(resolution))):
        return None
    if payload.get("checksum") != images_checksum(images):
        print(f"the image cache {path} is damaged (its images do not match their checksum); rebuilding it",
              file=sys.stderr)
        return None
    names = payload.get("files")
    if not isinstance(names, list) or len(names) != len(images):
        return None
    return images, names


def _write_cache(path, payload):
    """Write atomically (a reader never sees half a file), then delete this split and resolution's older caches
    in the same folder, so rebuilding after a data change does not leave the old file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        torch.save(payload, temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    prefix = path.name[:-len("-0123456789abcdef.pt")]
    pattern = re.compile(re.escape(prefix) + r"-[0-9a-f]{16}\.pt")
    for old in path.parent.glob(prefix + "-*.pt"):
        if old != path and pattern.fullmatch(old.name):
            old.unlink(missing_ok=True)


def cached_images(data_dir, split, resolution, cache_dir="", num_workers=1, skip_bad_images=False,
                  next_to_data=True, resize="squash", with_names=False):
    """The split as a uint8 tensor (N, 3, H, W), decoded once and then loaded from the on-disk cache; with
    with_names, also the names of the images' files (image_name), which stay aligned with the images when
    skip_bad_images leaves some out.

    The cache (N * 3 * H * W bytes: 25 MB for 8,189 images at 32x32) lies next to the data when that folder is
    writable, else in cache_dir; it is rebuilt whenever cache_key changes, and runs with and without
    skip_bad_images share it. next_to_data=False keeps it in
    cache_dir. A cache that cannot be written is reported and the decoded images are returned anyway.
    """
    files = dataset_files(data_dir, split)
    key = cache_key(split, resolution, files, resize)
    read_from, write_to = _cache_locations(data_dir, split, resolution, key, cache_dir, next_to_data, resize)
    for path in read_from:
        cached = _read_cache(path, key, resolution)
        # A cache that left unreadable images out serves --skip-bad-images only: without it, decoding again
        # stops at the first bad file with its name. One with every image serves both.
        if cached is not None and (skip_bad_images or len(cached[1]) == len(files)):
            if len(cached[1]) < len(files):
                print(f"skipped {len(files) - len(cached[1])} unreadable image(s) of the {split!r} split (as when "
                      f"its cache was built)", file=sys.stderr)
            return cached if with_names else cached[0]
    images, kept = decode_images(files, resolution, num_workers, skip_bad_images,
                                 description=f"caching {split} {resolution}px", resize=resize)
    if len(kept) < len(files):
        print(f"skipped {len(files) - len(kept)} unreadable image(s) of the {split!r} split", file=sys.stderr)
    names = [image_name(data_dir, f) for f in kept]
    payload = {"key": key, "images": images, "checksum": images_checksum(images), "files": names}
    errors = []
    for path in write_to:
        try:
            _write_cache(path, payload)
            break
        except OSError as error:
            errors.append(f"{path}: {error.strerror or error}")
    else:
        print(f"could not write the image cache ({'; '.join(errors)}); the images will be decoded again next "
              f"time. Pass a writable --cache-dir", file=sys.stderr)
    return (images, names) if with_names else images


def split_images(data_dir, split, resolution, cache_dir="", num_workers=1, skip_bad_images=False, resize="squash"):
    """(uint8 images (N, 3, H, W), their names) of a split, or of several joined with + ("train+val"), in order;
    all the images of a folder data set, whatever the split. Each split has its own cache, so train+val reuses the
    caches of train and of val."""
    parts = [FOLDER_SPLIT] if is_image_folder(data_dir) else split.split("+")
    images, names = [], []
    for part in parts:
        part_images, part_names = cached_images(data_dir, part, resolution, cache_dir, num_workers, skip_bad_images,
                                                resize=resize, with_names=True)
        images.append(part_images)
        names += part_names
    return torch.cat(images), names


def flower_classes(data_dir, names):
    """The class of each image name: in Flowers102 its class (1-102, from imagelabels.mat; 0 for a name that is not
    one of its files), in a folder of images its sub-folder's (1, 2, ... in sorted order; 0 at the top level)."""
    if is_image_folder(data_dir):
        root = Path(data_dir)
        folders = sorted({f.relative_to(root).parts[0] for f in folder_files(root) if f.parent != root})
        return [folders.index(name.split("/")[0]) + 1 if name.split("/")[0] in folders and "/" in name else 0
                for name in names]
    from scipy.io import loadmat

    path = flowers_folder(data_dir) / "imagelabels.mat"
    try:
        labels = np.atleast_1d(loadmat(path, squeeze_me=True)["labels"])
    except Exception as error:  # scipy raises several types for a damaged or foreign .mat file
        raise UserError(f"cannot read the flower classes from {path} ({type(error).__name__}: {error}); replace "
                        f"it with Flowers102's official imagelabels.mat") from None
    numbers = [int(name[6:11]) if re.fullmatch(r"image_\d{5}\.jpg", name) else 0 for name in names]
    return [int(labels[n - 1]) if 0 < n <= len(labels) else 0 for n in numbers]


# -------------------------------------------------------------------------------------------- batches

def holdout_split(num_images, fraction, seed):
    """Seeded (train indices, held-out indices) with round(fraction * num_images) held out."""
    if not 0 <= fraction < 1:
        raise UserError(f"--holdout must be in [0, 1), got {fraction}")
    permutation = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))
    held_out = max(1, round(fraction * num_images)) if fraction > 0 else 0
    if held_out >= num_images:
        raise UserError(f"--holdout {fraction} holds out all {num_images} images and leaves none to train on; "
                        f"use a smaller --holdout")
    return permutation[held_out:].sort().values, permutation[:held_out].sort().values


def dataset_images(data_dir, split, resolution, subset="all", holdout=0.0, holdout_seed=0, cache_dir="",
                   num_workers=1, skip_bad_images=False, resize="squash"):
    """(uint8 images (N, 3, R, R), their names) of a split (split_images): the one way training and inference load
    data. subset "all" is the whole split; with holdout > 0, "held-out" is exactly the images a training run with
    --holdout HOLDOUT --seed HOLDOUT_SEED evaluated on, and "train" the ones it trained on."""
    images, names = split_images(data_dir, split, resolution, cache_dir, num_workers, skip_bad_images, resize)
    if subset == "all" or holdout == 0:
        return images, names
    train_index, held_out_index = holdout_split(len(images), holdout, holdout_seed)
    index = held_out_index if subset == "held-out" else train_index
    return images[index], [names[i] for i in index.tolist()]


def fingerprint(images):
    """{"images": count, "sha256": of the pixels} of a uint8 image tensor: the same photos give the same
    fingerprint wherever they are on disk, and any other image, one more or one fewer does not."""
    pixels = images.contiguous().numpy() if images is not None else np.empty(0, dtype=np.uint8)
    return {"images": 0 if images is None else len(images), "sha256": hashlib.sha256(pixels).hexdigest()}


def random_subset(num_images, size, seed):
    """Sorted indices of a seeded random draw of `size` images out of num_images; all of them (0, 1, ...) when size
    is 0 or at least num_images. The same arguments give the same indices.

    Flowers102's split lists (setid.mat) are sorted by class: the first 512 test images span 14 of its 102
    classes. An evaluation set, a grid's batch or an FID reference set is therefore drawn with this, never
    taken as the first N.
    """
    if size < 0:
        raise UserError(f"a subset size must be 0 (all images) or more, got {size}")
    if size == 0 or size >= num_images:
        return torch.arange(num_images)
    # holdout_split seeds its generator with the seed itself; with the same seed and count this draw would be
    # exactly the held-out images. Hashing gives another stream (torch's CPU generator keeps 32 bits of a seed).
    stream = int.from_bytes(hashlib.sha256(f"random_subset {seed}".encode()).digest()[:4], "little")
    generator = torch.Generator().manual_seed(stream)
    return torch.randperm(num_images, generator=generator)[:size].sort().values


def to_float(batch_uint8):
    """uint8 [0, 255] -> float [0, 1], done on whatever device the batch is on."""
    return batch_uint8.float().div_(255)


class ImageBatches:
    """Seeded, reshuffled-per-epoch batches of a uint8 image tensor, delivered as floats on `device`.

    The order of epoch e depends only on (seed, e), so a resumed run sees the batches it would have seen; so do
    the random horizontal flips of hflip=True (each image flipped with probability 1/2, drawn per epoch).
    With rank/world_size each process takes its own shard of every epoch's permutation.
    """

    def __init__(self, images, batch_size, device, shuffle=True, seed=0, rank=0, world_size=1, hflip=False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        # On a GPU the whole uint8 set (100 MB for 8,189 images at 64x64) lives there: no copy per batch.
        self.images = images.to(device) if torch.device(device).type == "cuda" else images
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.hflip = hflip

    def _generator(self, epoch):
        return torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)

    def indices(self, epoch):
        """This rank's image indices for the epoch, in the order they are served.

        When shuffling for several ranks the epoch is cut to a multiple of world_size (at most world_size - 1
        images, different ones each epoch), so every rank takes the same number of steps, as DDP requires.
        """
        if self.shuffle:
            order = torch.randperm(len(self.images), generator=self._generator(epoch))
            order = order[:len(order) - len(order) % self.world_size]
        else:
            order = torch.arange(len(self.images))
        return order[self.rank::self.world_size]

    def __len__(self):
        """Batches per epoch on this rank (the last one may be smaller)."""
        usable = len(self.images) - (len(self.images) % self.world_size if self.shuffle else 0)
        return math.ceil(len(range(self.rank, usable, self.world_size)) / self.batch_size)

    def epoch(self, epoch, start_batch=0):
        """Yield the epoch's float batches (B, 3, H, W) in [0, 1] on the device, skipping the first start_batch.

        The uint8 batch crosses to the device and is converted there: a quarter of the bytes of a float copy.
        """
        order = self.indices(epoch)
        if self.hflip:  # one coin per image of the data set, drawn after the permutation from the same generator
            generator = self._generator(epoch)
            torch.randperm(len(self.images), generator=generator)
            flipped = torch.rand(len(self.images), generator=generator) < 0.5
        for start in range(start_batch * self.batch_size, len(order), self.batch_size):
            index = order[start:start + self.batch_size]
            batch = to_float(self.images[index].to(self.device, non_blocking=True))
            if self.hflip:
                flip = flipped[index].to(self.device)
                batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
            yield batch


def generated_flowers(count=512, resolution=32, seed=0):
    """uint8 images (count, 3, R, R) of drawn flowers: petals of one random hue around a yellow-brown centre on a
    green-brown background, each with its own number of petals, size and turn. For the notebook and smoke runs when
    no Flowers102 is on disk: the pipeline works on them, but they are no substitute for the photos."""
    generator = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    axis = torch.linspace(-1, 1, resolution)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    radius, angle = (x.pow(2) + y.pow(2)).sqrt(), torch.atan2(y, x)
    petals = torch.randint(4, 9, (count, 1, 1), generator=generator)
    size = 0.45 + 0.45 * rand(count, 1, 1)
    turn = rand(count, 1, 1) * 6.3
    outline = size * (0.55 + 0.45 * torch.cos(petals * (angle + turn)).abs())  # the petals' edge at each angle
    flower = (radius < outline).float()
    centre = (radius < 0.25 * size).float()
    petal_colour = rand(count, 3, 1, 1)
    background = torch.tensor([0.25, 0.4, 0.15]).view(1, 3, 1, 1) * (0.5 + rand(count, 1, 1, 1))
    image = background * (1 - flower[:, None]) + petal_colour * flower[:, None]
    image = image * (1 - centre[:, None]) + torch.tensor([0.85, 0.7, 0.1]).view(1, 3, 1, 1) * centre[:, None]
    image = image + 0.03 * torch.randn(image.shape, generator=generator)  # some texture
    return (image.clamp(0, 1) * 255).round().to(torch.uint8)
