"""Image files -> uint8 RGB images at a resolution: one file (decode_rgb, load_image), or many in worker
processes that Ctrl-C and SIGTERM end cleanly (decode_images).

Non-square photos are resized to the square in one of two ways, the same in training and inference: "squash" (the
tutorial's Resize((R, R)): the whole photo, its aspect ratio lost) or "center-crop" (the largest centred square,
then resized: the aspect ratio kept, the sides lost). Each image is decoded in JPEG draft mode to at least twice
the target size, then resized with an antialiased bilinear filter: the same filter torchvision's Resize applies
to PIL images.

Every mode Pillow opens is decoded as an image viewer shows it (16-bit greyscale scaled, not clipped to white;
transparency composited on white; CMYK, palette and 1-bit converted); modes with no agreed meaning are refused
by name. Training (the cache, decode_images) does not apply the EXIF orientation tag: it follows the tutorial's
decoding, torchvision's Flowers102 loader (`Image.open(f).convert("RGB")`), and Flowers102's JPEGs carry no
EXIF data at all (none of the 2,040 train and val files has an APP1 segment), so the result is the same.
Inference (load_image) applies it, so a phone photo is used upright.
"""

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import struct
import threading
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from vae.errors import UserError

RESIZES = ("squash", "center-crop")
RESIZE_METHOD = "jpeg-draft-2x+bilinear-antialias"


def height_width(resolution):
    """(height, width) of a resolution given as one number (a square) or as a pair."""
    return (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)


# Modes that hold one 16-bit (or wider) grey channel: PNG and TIFF 16-bit greyscale open as one of them.
SIXTEEN_BIT_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")
WITH_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")
EXIF_ORIENTATION = 0x0112  # the tag's number in the EXIF standard
# What Pillow raises for a file it cannot decode: not an image, truncated, damaged (OSError covers
# UnidentifiedImageError, a missing file and a directory), a mode it cannot convert (ValueError), or too many pixels.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error)
# The largest photo decoded, for the command line and the page alike: a phone's 200-megapixel mode. A JPEG that
# large decodes in draft mode at 1/8 scale (3 megapixels); other formats decode whole (600 MB for 200 MP of RGB).
MAX_MEGAPIXELS = 200
# Pillow refuses, inside Image.open, images of over twice its MAX_IMAGE_PIXELS (179 megapixels by default): raised
# to this limit (never lowered), so that opened() can refuse by this project's rule and in its words.
Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, int(MAX_MEGAPIXELS * 1e6))


class ImageTooLarge(Exception):
    """An image with more pixels than MAX_MEGAPIXELS; the message says how many and what to do."""

    def __init__(self, size):
        super().__init__(f"{size}, more than the {MAX_MEGAPIXELS} megapixels this project decodes; save a smaller "
                         f"copy of it")


@contextlib.contextmanager
def opened(path):
    """Image.open with this project's one size limit in place of Pillow's: Pillow warns about "decompression
    bombs" above 89 megapixels and refuses above 179, in its own words; here a photo of up to MAX_MEGAPIXELS
    opens quietly and a larger one is refused (ImageTooLarge), naming its size, before any pixel is decoded."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as image:
                width, height = image.size
                if width * height > MAX_MEGAPIXELS * 1e6:
                    raise ImageTooLarge(f"it is {width} x {height} pixels ({width * height / 1e6:.0f} megapixels)")
                yield image
        except Image.DecompressionBombError:  # over twice Pillow's own limit, refused before the size is known
            raise ImageTooLarge(f"it has more than {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels") from None


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
    height, width = height_width(resolution)
    try:
        with opened(path) as image:
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
    except (_UnsupportedMode, ImageTooLarge) as error:
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


# The two ways a multiprocessing Connection sends a message (the pool's queues use send_bytes).
_SENDS = tuple(getattr(multiprocessing.connection.Connection, name).__code__ for name in ("send_bytes", "send"))


def _sending(frame):
    """Whether the code a signal interrupted is sending a message through a multiprocessing Connection."""
    while frame is not None:
        if any(frame.f_code is code for code in _SENDS):
            return True
        frame = frame.f_back
    return False


def _exit_quietly(signum, frame):
    # SystemExit unwinds the worker's `with` blocks, so a lock of the pool's queues that it holds (an idle worker
    # holds the task queue's while it waits for work) is released, and the process ends without a traceback. In
    # the middle of sending a chunk's images it would leave half a message, and the main process waiting for the
    # rest: the signal comes again shortly, until the message is whole.
    if _sending(frame):
        again = threading.Timer(0.05, os.kill, (os.getpid(), signum))
        again.daemon = True
        again.start()
        return
    raise SystemExit(128 + signum)


def _worker_signals():
    """Pool initializer. Ctrl-C in a terminal sends SIGINT to every process of the group; the workers ignore it, so
    only the main process raises KeyboardInterrupt (and ends them) instead of each worker printing a traceback.

    SIGTERM, from Pool.terminate() or sent to the whole group (a job scheduler, `kill -TERM -PGID`), ends a worker
    silently by raising SystemExit (a fork inherits the main process's handler, which would raise
    KeyboardInterrupt). Its default action would end the worker at once, and one ended while it waits for work
    dies holding the task queue's lock: Pool.terminate() in the main process then waits for that lock forever.
    Last, the worker lets through the SIGTERM it was born holding (see _sigterm_held)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_quietly)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


@contextlib.contextmanager
def _sigterm_held():
    """Workers forked inside this block are born with SIGTERM blocked, until _worker_signals has run. Otherwise a
    Pool.terminate() that comes right after the pool started (the first images are corrupt, on a busy machine)
    can send its SIGTERM before the new worker's interpreter has finished forking: the handler inherited from this
    process notes it, the interpreter then clears the signals that came in before it was ready, and the worker
    lives on, idle, while terminate() waits for it forever. Blocked, the signal waits, and ends the worker as
    soon as its initializer has set the worker's own SIGTERM handler."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no fork, no signals between processes
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


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
            with _sigterm_held():
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
    height, width = height_width(resolution)
    images = torch.empty((len(kept), 3, height, width), dtype=torch.uint8)
    for row, i in enumerate(kept):
        images[row] = torch.from_numpy(decoded[i]).permute(2, 0, 1)
    return images, [files[i] for i in kept]
