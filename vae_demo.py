"""A web page for a trained VAE: variations of your own photo, interpolation between two photos, new flowers (of
your photo's kind, too), and a walk of the code of a flower's kind.

    pip install -r requirements-demo.txt
    python vae_demo.py                                   # http://127.0.0.1:7860, pretrained/flowers32.pt
    python vae_demo.py --checkpoint runs/NAME/checkpoint.pt --port 7861

The page is vae.inference (what vae_inference.py runs) behind Gradio controls. It serves on the loopback
address only: the page is for the machine it runs on. An upload is checked before it is decoded, and whatever
is wrong with it (not an image, too many pixels) or worth knowing (greyscale, transparent) is shown on the page.
"""

import vae.quiet_start  # first: Ctrl-C while the libraries below load exits at once (see its docstring)

import argparse
import ctypes
import os
import secrets
import stat
import sys
from pathlib import Path

import torch
from torchvision.transforms.functional import to_pil_image

from datasets.decoding import ImageTooLarge, opened
from vae import inference
from vae.config import RANGES, check_range
from vae.device import DEVICES, model_device, pick_device
from vae.errors import UserError
from vae.kind_prior import WALK_RANGE, KindPrior
from vae.trained import load_model

REPO = Path(__file__).resolve().parent
# The shipped model (recipes/flowers32.json), as for vae_inference.py.
PRETRAINED = Path(__file__).resolve().parent / "pretrained" / "flowers32.pt"
# Photos of Flowers102 that pretrained/flowers32.pt was not trained on (its held-out images).
EXAMPLES = sorted((REPO / "pretrained" / "examples").glob("*.jpg"))
HOST = "127.0.0.1"
MAX_UPLOAD_MB = 25
# An upload of more pixels than datasets.decoding.MAX_MEGAPIXELS is refused before decoding: a small file can hold
# a huge image (a "decompression bomb").
CACHE_MINUTES = 15  # how long the page keeps the files of an upload or of the pictures it showed
CONCURRENT_REQUESTS = 1  # requests computed at once; the others wait in Gradio's queue, so memory stays bounded
# Bounds of the controls, checked again on the server: the page's API can be called without the page.
# The page's controls, narrower than the command line's RANGES where one request could otherwise hold a public
# server for minutes (tests/test_inference.py checks that they lie within RANGES).
PAGE_LIMITS = {"num": (1, 32), "steps": (2, 16), "temperature": (0.0, 3.0), "strength": RANGES["strength"],
               "seed": RANGES["seed"]}
COUNT, STEPS, TEMPERATURE, STRENGTH, SEED = (PAGE_LIMITS[name] for name in ("num", "steps", "temperature", "strength",
                                                                             "seed"))
WALK_ROWS = (1, 8)  # rows of the walk of the kind code: its principal directions
WALK_STEPS = 9  # images per row of a walk of the code; how far it goes: WALK_RANGE


# ------------------------------------------------------------------------------------------ uploads

def upload_path(upload):
    """(path, name the user gave it) of an upload: a path, or Gradio's file payload (a dict)."""
    if isinstance(upload, dict):
        return upload["path"], upload.get("orig_name") or Path(upload["path"]).name
    return str(upload), Path(upload).name


def check_upload(path, name):
    """Reads only an upload's header and refuses what the model cannot take; returns notes worth showing."""
    try:
        with opened(path) as image:
            # An alpha channel alone says nothing: many PNGs carry one that is opaque everywhere.
            transparent = (image.has_transparency_data
                           and image.convert("RGBA").getchannel("A").getextrema()[0] < 255)
    except ImageTooLarge as error:
        raise UserError(f"{name}: {error}, and upload that") from None
    except FileNotFoundError:
        raise gone(name) from None
    except (OSError, ValueError, SyntaxError):
        raise unreadable(name) from None
    return [f"{name} has transparent parts: the model sees them as white."] if transparent else []


def release_memory():
    """Hand the memory a large upload's decoding freed back to the operating system: glibc keeps freed blocks for
    the process otherwise, so one 7000 x 7000 photo would double the server's resident size for good. (The decoded
    photo itself is freed as soon as nothing refers to it; no garbage collection is needed, and it would cost
    a fifth of a second per upload in a large process.)"""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to trim
        pass


def unreadable(name):
    return UserError(f"{name} is not an image this page can read; upload a JPEG, PNG or WebP photo")


def gone(name):
    return UserError(f"{name} is no longer on this server (the page keeps uploads for {CACHE_MINUTES} minutes); "
                     f"upload it again")


def check_served(path, name, folders):
    """Refuses a path outside `folders` (resolved, links followed) or that is not a regular file, with the message of
    any unreadable upload: the page's API takes a path in its payload, and must read only files Gradio wrote for
    it (its upload folder) or the bundled examples, never another file of the server, nor say which exist. A named
    pipe or a device is refused before it is opened, so it cannot hold the page's worker."""
    try:
        resolved = Path(path).resolve(strict=True)
        inside = any(resolved.is_relative_to(folder) for folder in folders)
        if not inside or not stat.S_ISREG(resolved.stat().st_mode):
            raise unreadable(name)
    except FileNotFoundError:
        # Said only of a path inside the served folders (as written, ".." removed), so it tells nothing about the
        # rest of the server: an upload that the page's cache has since deleted.
        written = Path(os.path.normpath(os.path.abspath(path)))
        if any(written.is_relative_to(folder) for folder in folders):
            raise gone(name) from None
        raise unreadable(name) from None
    except (OSError, RuntimeError, ValueError):
        raise unreadable(name) from None


def served_folders():
    """The folders the page reads uploads from: Gradio's upload folder and the bundled examples."""
    from gradio.utils import get_upload_folder

    return tuple(Path(folder).resolve() for folder in (get_upload_folder(), REPO / "pretrained" / "examples"))


def read_upload(upload, model, what="photo", resize="squash", folders=None):
    """(image (1, 3, R, R) on the model's device, notes) of an upload, preprocessed as training did (resize: the
    checkpoint's --resize). folders: where uploads may come from (None: anywhere, for a caller in this process; the
    served page passes served_folders()). The decoded full-size photo is freed, and its memory released, before it
    returns."""
    if upload is None:
        raise UserError(f"upload a {what} first, or pick an example")
    path, name = upload_path(upload)
    if folders is not None:
        check_served(path, name, folders)
    notes = check_upload(path, name)
    try:
        x = inference.load_images([path], model, model_device(model), resize)
    except UserError:
        raise UserError(f"{name} could not be decoded (a damaged or cut-off file?); upload another photo") from None
    finally:
        release_memory()
    if torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2]):
        notes.append(f"{name} is greyscale: the model, trained on colour photos, sees a grey colour photo.")
    return x, notes


# -------------------------------------------------------------------------------------------- the page

class Demo:
    """The trained model and what the page does with it. Each method returns the page's outputs and a message:
    a problem with the input empties the outputs and says what to do instead."""

    def __init__(self, checkpoint_path, device, scale=4, folders=None):
        self.folders = folders  # where uploads may come from: None anywhere, served_folders() when served
        self.trained = load_model(checkpoint_path, device)
        self.model = self.trained.model
        self.resize = self.trained.config.resize  # how training squared photos
        self.samplers = list(self.trained.samplers)  # the prior, then those fitted, in the order they were
        # The variation modes this checkpoint can run, best first: the first is the page's default.
        self.mode_descriptions = inference.variation_modes(self.trained.samplers)
        self.modes = list(self.mode_descriptions)
        self.scale = scale

    def read(self, upload, what="photo"):
        return read_upload(upload, self.model, what, self.resize, self.folders)

    def pictures(self, images):
        """Model images (N, 3, R, R) in [0, 1] as PIL images, enlarged by `scale` with hard pixel edges."""
        return [to_pil_image(image) for image in inference.enlarge(images.float().cpu(), self.scale)]

    def variations(self, upload, mode, count, strength, seed, fixed_seed=False):
        """(what the model sees, its reconstruction, the variations, message, the seed used). A new random seed
        on every call unless fixed_seed, so that each press gives new flowers."""
        try:
            seed = seed_for(seed, fixed_seed)
            x, notes = self.read(upload)
            if mode not in self.modes:
                raise UserError(f"this checkpoint cannot make {mode} variations; pick one of {', '.join(self.modes)}")
            count = int(check_range("the number of variations", count, COUNT))
            strength = check_range("the strength", strength, STRENGTH)
            generator = torch.Generator().manual_seed(seed)
            images, _, mean = inference.variations(self.model, x, count, strength, generator, mode,
                                                   self.trained.samplers)
            with torch.no_grad():
                seen, reconstruction = self.pictures(torch.cat([x, self.model.decode(mean)]))
            return seen, reconstruction, self.pictures(images), message(notes), seed
        except UserError as error:
            return None, None, [], message(error=error), shown_seed(seed)

    def interpolation(self, upload_a, upload_b, steps, spherical):
        """(the decoded path from photo A to photo B, message)."""
        try:
            x_a, notes_a = self.read(upload_a, "photo A")
            x_b, notes_b = self.read(upload_b, "photo B")
            steps = int(check_range("the number of steps", steps, STEPS))
            images = inference.interpolate(self.model, x_a, x_b, steps, spherical=bool(spherical))
            return self.pictures(images), message(notes_a + notes_b)
        except UserError as error:
            return [], message(error=error)

    def kind(self):
        """The checkpoint's kind sampler, or a one-line error that says how to fit one."""
        if KindPrior.name not in self.trained.samplers:
            raise UserError("this checkpoint has no kind sampler, which new flowers of a photo's kind and the walk "
                            "of its code need; fit one with vae_inference.py export --fit-samplers kind")
        return self.trained.samplers[KindPrior.name]

    def more_like(self, upload, count, temperature, seed, fixed_seed=False):
        """(new flowers of the kind of the photo uploaded for variations, message, the seed used)."""
        try:
            seed = seed_for(seed, fixed_seed)
            kind = self.kind()
            if upload is None:
                raise UserError("upload a photo under 'New flowers like your photo' first: these are drawn with its "
                                "kind")
            x, notes = self.read(upload)
            count = int(check_range("the number of samples", count, COUNT))
            temperature = check_range("the temperature", temperature, TEMPERATURE)
            images = inference.samples_of_kind(self.model, kind, inference.kind_codes(self.model, kind, x), count,
                                               temperature, torch.Generator().manual_seed(seed))[0]
            return self.pictures(images), message(notes), seed
        except UserError as error:
            return [], message(error=error), shown_seed(seed)

    def walk(self, upload, rows, seed, fixed_seed=False):
        """(a traversal of the code: a row per principal direction, around the uploaded photo's code or the
        training photos' commonest code (KindPrior.typical_code); message; the seed used)."""
        try:
            seed = seed_for(seed, fixed_seed)
            kind = self.kind()
            rows = int(check_range("the number of rows", rows, WALK_ROWS))
            notes = []
            if upload is None:
                code = kind.typical_code()
            else:
                x, notes = self.read(upload)
                code = inference.kind_codes(self.model, kind, x)
            images = inference.walk_code(self.model, kind, code, WALK_RANGE, WALK_STEPS, rows,
                                         torch.Generator().manual_seed(seed))
            return self.pictures(images), message(notes), seed
        except UserError as error:
            return [], message(error=error), shown_seed(seed)

    def samples(self, sampler, count, temperature, seed, fixed_seed=False):
        """(new images from a sampler the checkpoint has, message, the seed used: new unless fixed_seed)."""
        try:
            seed = seed_for(seed, fixed_seed)
            if sampler not in self.samplers:
                raise UserError(f"this checkpoint has no {sampler} sampler; pick one of {', '.join(self.samplers)}")
            count = int(check_range("the number of samples", count, COUNT))
            temperature = check_range("the temperature", temperature, TEMPERATURE)
            images = inference.sample_images(self.model, self.trained.samplers[sampler], count, temperature,
                                             torch.Generator().manual_seed(seed))[0]
            return self.pictures(images), message(), seed
        except UserError as error:
            return [], message(error=error), shown_seed(seed)


def seed_for(seed, fixed):
    """The seed a draw uses: the user's when fixed (checked), else a new random one."""
    if not fixed:
        return secrets.randbelow(SEED[1] + 1)
    return int(check_range("the seed", seed, SEED))


def shown_seed(seed):
    """The seed to show back after an error: the one given when the seed box can hold it, else an empty box (a
    request may send any value)."""
    valid = isinstance(seed, int) and not isinstance(seed, bool) and SEED[0] <= seed <= SEED[1]
    return seed if valid else None


def message(notes=(), error=None):
    """A section's message (Markdown): what went wrong, or what is worth knowing about the upload."""
    if error is not None:
        return f"**Error:** {error}"
    return "\n\n".join(f"**Note:** {note}" for note in notes)


def seed_controls(gr, elem_id):
    """The seed of a random draw, and whether it is fixed: each press draws a new one and shows it here."""
    return (gr.Number(value=0, precision=0, minimum=0, label="Seed (the last one used)", elem_id=f"{elem_id}-seed"),
            gr.Checkbox(label="Fix the seed (repeat the last draw)", elem_id=f"{elem_id}-fixed"))


def build_page(demo, checkpoint_name):
    """The Gradio Blocks of the page (not launched)."""
    import gradio as gr

    height, width = demo.model.image_resolution
    examples = [str(path) for path in EXAMPLES]
    # preprocess=False hands the upload to read_upload as it came: Gradio's own decoding would fail on a bad
    # upload with a message of its own, and would decode a huge image in full before any check.
    raw = {"preprocess": False}
    gallery = {"format": "png", "columns": 8, "object_fit": "contain", "allow_preview": False}
    inputs = {"type": "filepath", "sources": ["upload"], "height": 260}
    # Gradio keeps every upload and every picture it served as a file: delete_cache removes those older than
    # CACHE_MINUTES every minute, so the temporary folder holds what was shown recently, not all of it.
    with gr.Blocks(title="VAE on Flowers102", analytics_enabled=False, delete_cache=(60, 60 * CACHE_MINUTES)) as page:
        gr.Markdown(f"# VAE on Flowers102\nModel: `{checkpoint_name}`, {width}x{height} pixels, "
                    f"samplers: {', '.join(demo.samplers)}. Images are shown {demo.scale}x enlarged.")

        gr.Markdown("## New flowers like your photo\nThe photo is encoded to its latent code; its reconstruction "
                    "is decoded from the posterior mean. **Strength** says how far the variations go: near 0 they "
                    f"are the photo, around {inference.DEFAULT_STRENGTH:g} another flower of its kind, at 1 any "
                    "flower. "
                    f"Modes: {'; '.join(f'**{m}**: {demo.mode_descriptions[m]}' for m in demo.modes)}.")
        with gr.Row():
            photo = gr.Image(label="Your photo", elem_id="photo", **inputs)
            seen = gr.Image(label="What the model sees", format="png", interactive=False, height=260, elem_id="seen")
            reconstruction = gr.Image(label="Reconstruction", format="png", interactive=False, height=260,
                                      elem_id="reconstruction")
        variation_message = gr.Markdown(elem_id="variations-message")  # beside the upload, where it is seen
        gr.Examples(examples, inputs=photo, label="Example photos (not trained on)", elem_id="examples")
        with gr.Row():
            strength = gr.Slider(*STRENGTH, value=inference.DEFAULT_STRENGTH, step=0.05, label="Strength",
                                 elem_id="strength")
            count = gr.Slider(*COUNT, value=8, step=1, label="Variations")
            mode = gr.Radio(demo.modes, value=demo.modes[0], label="Mode", elem_id="mode")
        with gr.Row():
            seed, fixed = seed_controls(gr, "variations")
        vary = gr.Button("Make variations", variant="primary", elem_id="vary")
        variation_gallery = gr.Gallery(label="Variations", elem_id="variations", height=200, **gallery)
        outputs = [seen, reconstruction, variation_gallery, variation_message, seed]
        for event in (photo.change, vary.click):
            event(demo.variations, [photo, mode, count, strength, seed, fixed], outputs, **raw)

        gr.Markdown("## Interpolate between two photos\nDecoded points on the path between the two posterior "
                    "means; spherical follows the great circle (slerp).")
        with gr.Row():
            photo_a = gr.Image(label="Photo A", elem_id="photo-a", **inputs)
            photo_b = gr.Image(label="Photo B", elem_id="photo-b", **inputs)
        path_message = gr.Markdown(elem_id="path-message")
        gr.Examples([examples[i:i + 2] for i in range(0, len(examples) - 1, 2)], inputs=[photo_a, photo_b],
                    label="Example pairs")
        with gr.Row():
            steps = gr.Slider(*STEPS, value=8, step=1, label="Steps")
            spherical = gr.Checkbox(label="Spherical (slerp)")
        interpolate = gr.Button("Interpolate", variant="primary", elem_id="interpolate")
        path_gallery = gr.Gallery(label="A to B", elem_id="path", height=200, **gallery)
        interpolate.click(demo.interpolation, [photo_a, photo_b, steps, spherical], [path_gallery, path_message],
                          **raw)

        gr.Markdown("## New flowers\nDecoded draws of a sampler: the prior N(0, I), or one fitted to the training "
                    "images' posteriors and stored in the checkpoint (diffusion: a learned diffusion prior; kind: a "
                    "code of a flower's kind drawn first, then the rest given it).")
        with gr.Row():
            sampler = gr.Radio(demo.samplers, value=demo.trained.best_sampler(), label="Sampler",
                               elem_id="sampler")
            sample_count = gr.Slider(*COUNT, value=16, step=1, label="Samples")
            sample_temperature = gr.Slider(*TEMPERATURE, value=1.0, step=0.05, label="Temperature")
        with gr.Row():
            sample_seed, sample_fixed = seed_controls(gr, "samples")
        draw = gr.Button("Draw samples", variant="primary", elem_id="draw")
        sample_gallery = gr.Gallery(label="Samples", elem_id="samples", height=360, **gallery)
        sample_message = gr.Markdown(elem_id="samples-message")
        draw.click(demo.samples, [sampler, sample_count, sample_temperature, sample_seed, sample_fixed],
                   [sample_gallery, sample_message, sample_seed], **raw)
        if KindPrior.name in demo.trained.samplers:
            more = gr.Button("More like your photo (its kind, from the photo above)", elem_id="more-like")
            more.click(demo.more_like, [photo, sample_count, sample_temperature, sample_seed, sample_fixed],
                       [sample_gallery, sample_message, sample_seed], **raw)

            gr.Markdown("## What the code of a flower's kind holds\nEach row moves the kind code along one of its "
                        f"principal directions (largest spread first), from -{WALK_RANGE:g} to +{WALK_RANGE:g} "
                        "spreads, around the photo above (or the training photos' mean); every image is drawn from "
                        "the same noise, so only the kind changes.")
            with gr.Row():
                walk_rows = gr.Slider(*WALK_ROWS, value=4, step=1, label="Rows (directions)")
                walk_seed, walk_fixed = seed_controls(gr, "walk")
            walk = gr.Button("Walk the code", variant="primary", elem_id="walk")
            walk_gallery = gr.Gallery(label="Walk", elem_id="walk-images", height=360,
                                      **{**gallery, "columns": WALK_STEPS})
            walk_message = gr.Markdown(elem_id="walk-message")
            walk.click(demo.walk, [photo, walk_rows, walk_seed, walk_fixed], [walk_gallery, walk_message, walk_seed],
                       **raw)
    return page


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", default=str(PRETRAINED), help="checkpoint of a training run, or an export")
    parser.add_argument("--port", type=int, default=7860, help="port on 127.0.0.1 to serve the page on")
    parser.add_argument("--device", default="auto", choices=DEVICES, help="where the model runs")
    parser.add_argument("--scale", type=int, default=4, help="enlarge every image by this factor (nearest "
                        "neighbour) so the model's pixels stay visible")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        check_range("--port", args.port, (1, 65535))
        check_range("--scale", args.scale, (1, 16))
        demo = Demo(args.checkpoint, pick_device(args.device), args.scale)  # before Gradio's import (2 s)
        try:
            import gradio as gr
        except ImportError:
            raise UserError("the web page needs Gradio: pip install -r requirements-demo.txt") from None
        demo.folders = served_folders()
        page = build_page(demo, os.path.relpath(args.checkpoint, Path.cwd()))
        page.queue(default_concurrency_limit=CONCURRENT_REQUESTS)
        try:
            page.launch(server_name=HOST, server_port=args.port, max_file_size=f"{MAX_UPLOAD_MB}mb",
                        theme=gr.themes.Default())
        except OSError as error:
            raise UserError(f"cannot serve on {HOST}:{args.port} ({error}); pass a free --port") from None
        return 0
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    vae.quiet_start.loaded()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    sys.exit(main())
