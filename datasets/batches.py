"""A uint8 image tensor served as seeded float batches (ImageBatches), and the seeded draws that pick images out of
one: the hold-out split, random subsets; fingerprint tells one set of images from another by its pixels."""

import hashlib
import math

import numpy as np
import torch

from vae.errors import UserError


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
