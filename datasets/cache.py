"""The decode-once cache: a split's images at one resolution, stored on disk as one uint8 tensor (cached_images).

The tutorial's pipeline decodes and resizes every full-size JPEG on every epoch, which on a laptop is far
slower than the 32x32 model's training step. Here each image is decoded once, the result is written atomically
with a checksum of its pixels, next to the data when that folder is writable (else in --cache-dir), and rebuilt
whenever cache_key changes.
"""

import hashlib
import io
import json
import os
import re
import sys
from pathlib import Path

import torch

from datasets.decoding import RESIZE_METHOD, decode_images, height_width
from datasets.folders import dataset_files, image_names, images_folder, is_image_folder

CACHE_FORMAT = 3  # bumped whenever the cached payload changes, so old files are rebuilt (3: checksum)


def default_cache_dir():
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vae-flowers"


def cache_key(split, resolution, files, resize="squash", names=None):
    """16 hex digits that change whenever the split, resolution, resize method or any file (its name, size in
    bytes or modification time in ns) changes. names: each file's name in the data set (image_names: its path
    inside a folder of images, so that a photo moved to another class folder, or a renamed class folder, changes
    the key and the classes read from the names); None: the file names. One cache serves runs with and without
    --skip-bad-images (see cached_images)."""
    stats = []
    names = names or [os.path.basename(f) for f in files]
    for f, name in zip(files, names):  # os.path, not pathlib: 8,189 Path objects take longer than the cache
        stat = os.stat(f)
        stats.append((name, stat.st_size, stat.st_mtime_ns))
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


def _cache_prefix(data_dir, split, resolution, in_shared_folder, resize="squash"):
    size = "x".join(map(str, height_width(resolution)))
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
    key = cache_key(split, resolution, files, resize, image_names(data_dir, files))
    return _cache_locations(data_dir, split, resolution, key, cache_dir, next_to_data, resize)[1][0]


def images_checksum(images):
    """A hex digest of a uint8 image tensor's bytes. torch.load checks a file's structure, not its contents: a
    flipped bit on disk would otherwise be trained on without a word. SHA-256 has CPU instructions on most
    machines, so hashing the cache costs far less than decoding the images again."""
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
            or images.dtype != torch.uint8 or tuple(images.shape[1:]) != (3, *height_width(resolution))):
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
    buffer = io.BytesIO()
    torch.save(payload, buffer)  # in memory first: torch's writer reports a full disk as a RuntimeError
    try:
        temporary.write_bytes(buffer.getbuffer())
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
    with_names, also the names of the images' files (image_names), which stay aligned with the images when
    skip_bad_images leaves some out.

    The cache (N * 3 * H * W bytes: 25 MB for 8,189 images at 32x32) lies next to the data when that folder is
    writable, else in cache_dir; it is rebuilt whenever cache_key changes, and runs with and without
    skip_bad_images share it. next_to_data=False keeps it in
    cache_dir. A cache that cannot be written is reported and the decoded images are returned anyway.
    """
    files = dataset_files(data_dir, split)
    key = cache_key(split, resolution, files, resize, image_names(data_dir, files))
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
    names = image_names(data_dir, kept)
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
