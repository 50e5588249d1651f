"""Flowers102's files in DATA_DIR/flowers-102 (torchvision's layout: jpg/, setid.mat, imagelabels.mat): the
verified download, the image files of a split, and the class of each image."""

import os
import re
import shutil
import socket
from pathlib import Path

import numpy as np

from vae.errors import MissingData, UserError

SPLIT_KEYS = {"train": "trnid", "val": "valid", "test": "tstid"}
DOWNLOAD_TIMEOUT_S = 60


def flowers_folder(data_dir):
    """DATA_DIR/flowers-102, or DATA_DIR itself when it is that folder (it holds setid.mat and jpg/): a root given
    one level too deep is still read as Flowers102, with its splits and labels, not as a folder of images."""
    root = Path(data_dir)
    if (root / "setid.mat").is_file() and (root / "jpg").is_dir():
        return root
    return root / "flowers-102"


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
        raise MissingData(f"Flowers102 is not in {target} ({missing}) and {staging_root} cannot be created to "
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
        raise MissingData(
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
        if not Path(data_dir).is_dir():  # a mistyped path must not become a new folder with 330 MB in it
            raise UserError(f"the data folder {data_dir} does not exist; pass the folder that holds flowers-102/ "
                            f"(or a folder of your own images), or create {data_dir} for Flowers102 to be "
                            f"downloaded into it (330 MB)")
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


def flowers102_classes(data_dir, names):
    """The Flowers102 class of each image name (1-102, from imagelabels.mat; 0 for a name that is not one of its
    files)."""
    from scipy.io import loadmat

    path = flowers_folder(data_dir) / "imagelabels.mat"
    try:
        labels = np.atleast_1d(loadmat(path, squeeze_me=True)["labels"])
    except Exception as error:  # scipy raises several types for a damaged or foreign .mat file
        raise UserError(f"cannot read the flower classes from {path} ({type(error).__name__}: {error}); replace "
                        f"it with Flowers102's official imagelabels.mat") from None
    numbers = [int(name[6:11]) if re.fullmatch(r"image_\d{5}\.jpg", name) else 0 for name in names]
    return [int(labels[n - 1]) if 0 < n <= len(labels) else 0 for n in numbers]

