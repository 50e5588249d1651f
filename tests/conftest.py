"""Shared fixtures: a small Flowers102-format root built from real images, and a tiny trained checkpoint."""

import os
import shutil
import socket
import sys
from pathlib import Path

# Tiny models gain nothing from several threads, and OpenMP threads that spin while other processes hold the
# cores slow a test down many times over; children (the CLI runs) inherit the setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch
from scipy.io import savemat

REPO = Path(__file__).resolve().parent.parent
SHARED_FLOWERS = REPO.parent / "shared" / "data" / "flowers102-train" / "flowers-102"
sys.path.insert(0, str(REPO))
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def real_flower_files(count):
    files = sorted((SHARED_FLOWERS / "jpg").glob("image_*.jpg"))
    if len(files) < count:
        pytest.fail(f"need {count} real Flowers102 images in {SHARED_FLOWERS / 'jpg'}, found {len(files)}")
    return files[:count]


def make_flowers_root(root, train=32, val=8, test=8):
    """A Flowers102 root in torchvision's layout with real JPEGs and its own setid.mat/imagelabels.mat."""
    folder = Path(root) / "flowers-102"
    (folder / "jpg").mkdir(parents=True)
    sources = real_flower_files(train + val + test)
    for new_id, source in enumerate(sources, start=1):
        shutil.copy(source, folder / "jpg" / f"image_{new_id:05d}.jpg")
    ids = np.arange(1, len(sources) + 1)
    savemat(folder / "setid.mat", {"trnid": ids[:train], "valid": ids[train:train + val],
                                   "tstid": ids[train + val:]})
    savemat(folder / "imagelabels.mat", {"labels": (ids % 102) + 1})
    return Path(root)


def closed_port():
    """A loopback port where nothing listens: a download pointed at it fails at once, offline or not."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def flowers_root(tmp_path_factory):
    return make_flowers_root(tmp_path_factory.mktemp("flowers"))
