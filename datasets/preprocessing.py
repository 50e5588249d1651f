"""Images -> uint8 tensors, decoded once into an on-disk cache, served in seeded batches: the pipeline the
scripts use. dataset_images is the one way training and inference load a split.

The pieces live beside this file: flowers102.py (Flowers102's files and download), folders.py (which images a
data set holds), decoding.py (image file -> uint8 RGB), cache.py (the decode-once cache), batches.py (seeded
batches and draws) and synthetic.py (drawn flowers). The names the scripts import from them are re-exported
here, so `from datasets.preprocessing import ...` keeps working.
"""

import torch

from datasets.batches import ImageBatches, fingerprint, holdout_split, random_subset, to_float
from datasets.cache import cache_path, cached_images
from datasets.decoding import RESIZES, load_image
from datasets.flowers102 import SPLIT_KEYS, flowers102_files
from datasets.folders import FOLDER_SPLIT, flower_classes, images_folder, inside_images_folder, is_image_folder
from datasets.synthetic import generated_flowers

__all__ = ["RESIZES", "SPLIT_KEYS", "ImageBatches", "cache_path", "cached_images", "dataset_images", "fingerprint",
           "flower_classes", "flowers102_files", "generated_flowers", "holdout_split", "images_and_names",
           "images_folder", "inside_images_folder", "is_image_folder", "load_image", "random_subset", "to_float"]


def images_and_names(data_dir, split, resolution, cache_dir="", num_workers=1, skip_bad_images=False, resize="squash"):
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


def dataset_images(data_dir, split, resolution, subset="all", holdout=0.0, holdout_seed=0, cache_dir="",
                   num_workers=1, skip_bad_images=False, resize="squash"):
    """(uint8 images (N, 3, R, R), their names) of a split (images_and_names): the one way training and inference
    load data. subset "all" is the whole split; with holdout > 0, "held-out" is exactly the images a training run with
    --holdout HOLDOUT --seed HOLDOUT_SEED evaluated on, and "train" the ones it trained on."""
    images, names = images_and_names(data_dir, split, resolution, cache_dir, num_workers, skip_bad_images, resize)
    if subset == "all" or holdout == 0:
        return images, names
    train_index, held_out_index = holdout_split(len(images), holdout, holdout_seed)
    index = held_out_index if subset == "held-out" else train_index
    return images[index], [names[i] for i in index.tolist()]
