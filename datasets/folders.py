"""Which images a data set holds, and how they are named and classed.

A data set is a Flowers102 root (DATA_DIR/flowers-102 in torchvision's layout, with its train, val and test
splits) or any folder of images: flat, or one sub-folder per class (torchvision's ImageFolder layout; photos
deeper down belong to the class of their top-level sub-folder), whose one split is all of it ("all"; --holdout
carves an evaluation set out of it).
"""

import os
from pathlib import Path

from datasets.flowers102 import flowers102_classes, flowers102_files, flowers_folder

FOLDER_SPLIT = "all"  # a folder of images has one split: all of it
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def is_image_folder(data_dir):
    """Whether data_dir is a folder of images (flat, or one sub-folder per class) rather than a Flowers102 root."""
    root = Path(data_dir)
    return root.is_dir() and not flowers_folder(root).exists() and bool(folder_files(root))


def folder_files(data_dir):
    """The image files of a folder, sorted: those at its top level and those of its sub-folders at any depth, each
    sub-folder of the top level being a class (roses/2024/a.jpg is a rose). Hidden files and folders (the image
    cache's .vae-cache among them) are left out."""
    root = Path(data_dir)
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        files += [Path(folder) / name for name in names
                  if Path(name).suffix.lower() in IMAGE_SUFFIXES and not name.startswith(".")]
    return sorted((f for f in files if f.is_file()), key=lambda f: f.relative_to(root).as_posix())


def dataset_files(data_dir, split, download=True):
    """The image files of a split: a Flowers102 split, or every image of a folder (whose only split is "all")."""
    if is_image_folder(data_dir):
        return folder_files(data_dir)
    return flowers102_files(data_dir, split, download)


def image_names(data_dir, paths):
    """How images are named in names lists: each path's file name in Flowers102, its path inside a folder data set
    (so a photo's class folder is part of its name)."""
    if not is_image_folder(data_dir):
        return [os.path.basename(path) for path in paths]
    root = Path(data_dir)
    return [Path(path).relative_to(root).as_posix() for path in paths]


def images_folder(data_dir):
    """The folder that holds the images: DATA_DIR/flowers-102, or DATA_DIR itself for a folder of images."""
    return Path(data_dir) if is_image_folder(data_dir) else flowers_folder(data_dir)


def inside_images_folder(data_dir, path):
    """Whether path is the folder that holds data_dir's images, or lies inside it."""
    folder, path = images_folder(data_dir).resolve(), Path(path).resolve()
    return path == folder or folder in path.parents


def flower_classes(data_dir, names):
    """The class of each image name: in Flowers102 its class (1-102, from imagelabels.mat; 0 for a name that is not
    one of its files), in a folder of images its top-level sub-folder's (1, 2, ... in sorted order; 0 at the top
    level)."""
    if is_image_folder(data_dir):
        root = Path(data_dir)
        folders = sorted({f.relative_to(root).parts[0] for f in folder_files(root) if f.parent != root})
        return [folders.index(name.split("/")[0]) + 1 if name.split("/")[0] in folders and "/" in name else 0
                for name in names]
    return flowers102_classes(data_dir, names)


def class_labels(data_dir, names):
    """What the projector shows for each image's class: the name of its top-level sub-folder in a folder of
    images ("." for one at the top level), its class number (1-102) in Flowers102."""
    if is_image_folder(data_dir):
        return [name.split("/")[0] if "/" in name else "." for name in names]
    return [str(label) for label in flower_classes(data_dir, names)]
