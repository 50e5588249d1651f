"""Decoding images of every mode Pillow opens, the cache's checksum, signals during the cache build, subsets."""

import multiprocessing
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from conftest import REPO, collect, png_header
from datasets import decoding
from datasets.batches import holdout_split, random_subset
from datasets.cache import cache_path, cached_images
from datasets.decoding import decode_images, decode_rgb, load_image
from datasets.flowers102 import flowers102_files
from vae.errors import UserError


# ------------------------------------------------------------------------------------------------ helpers

def write_png(path, width, height, bit_depth, colour_type, pixel):
    """A PNG of one repeated pixel, written by hand: Pillow cannot write 16-bit colour PNGs.

    colour_type 0 is grey, 2 RGB, 4 grey + alpha, 6 RGBA (the PNG spec's numbers); pixel holds the raw bytes."""
    rows = b"".join(b"\0" + pixel * width for _ in range(height))  # filter byte 0 (none) before each row

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))
    return path


def both_decodings(path, size=4):
    """(training decoding, inference decoding) of path as uint8 arrays (H, W, 3)."""
    training = decode_images([path], size)[0][0].permute(1, 2, 0).numpy()
    inference = load_image(path, size).permute(1, 2, 0).numpy()
    return training, inference


def assert_colour(array, colour, tolerance=2):
    difference = np.abs(array.astype(int) - np.array(colour)).max()
    assert difference <= tolerance, f"expected {colour}, got {array.reshape(-1, 3)[:4].tolist()}"


# ---------------------------------------------------------------------------------------- modes and EXIF

@pytest.mark.parametrize("mode, suffix", [("I;16", ".png"), ("I;16B", ".tif"), ("I", ".tif")])
def test_sixteen_bit_grey_is_scaled_not_clipped_to_white(tmp_path, mode, suffix):
    path = tmp_path / f"grey{suffix}"
    array = np.full((8, 8), 32768, dtype={"I;16": "<u2", "I;16B": ">u2", "I": np.int32}[mode])
    Image.frombytes(mode, (8, 8), array.tobytes()).save(path)
    with Image.open(path) as image:
        assert image.mode == mode
    for decoded in both_decodings(path):
        assert_colour(decoded, (128, 128, 128), tolerance=1)


def test_sixteen_bit_colour_pngs(tmp_path):
    rgb = write_png(tmp_path / "rgb16.png", 8, 8, 16, 2, struct.pack(">HHH", 65535, 32768, 0))
    grey_alpha = write_png(tmp_path / "la16.png", 8, 8, 16, 4, struct.pack(">HH", 0, 0))  # black, transparent
    for decoded in both_decodings(rgb):
        assert_colour(decoded, (255, 128, 0), tolerance=1)
    for decoded in both_decodings(grey_alpha):
        assert_colour(decoded, (255, 255, 255), tolerance=0)


def test_palette_transparency_and_grey_alpha_are_composited_on_white(tmp_path):
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([200, 30, 40, 0, 0, 0])
    palette.paste(1, (0, 0, 8, 4))  # the top half uses the transparent index, whose stored colour is black
    palette.save(tmp_path / "palette.png", transparency=1)
    palette.save(tmp_path / "palette.gif", transparency=1)
    for path in (tmp_path / "palette.png", tmp_path / "palette.gif"):
        for decoded in both_decodings(path, size=8):
            assert_colour(decoded[:3], (255, 255, 255), tolerance=0)
            assert_colour(decoded[5:], (200, 30, 40), tolerance=0)

    grey_alpha = Image.new("LA", (8, 8), (0, 0))
    grey_alpha.paste((0, 255), (0, 4, 8, 8))
    grey_alpha.save(tmp_path / "la.png")
    for decoded in both_decodings(tmp_path / "la.png", size=8):
        assert_colour(decoded[:3], (255, 255, 255), tolerance=0)  # transparent black shows the white background
        assert_colour(decoded[5:], (0, 0, 0), tolerance=0)


def test_cmyk_jpeg_and_one_bit_images(tmp_path):
    Image.new("CMYK", (16, 16), (255, 0, 0, 0)).save(tmp_path / "cyan.jpg", quality=95)
    with Image.open(tmp_path / "cyan.jpg") as image:
        assert image.mode == "CMYK"
    for decoded in both_decodings(tmp_path / "cyan.jpg"):
        assert_colour(decoded, (0, 255, 255), tolerance=3)

    bits = Image.new("1", (8, 8), 0)
    bits.paste(1, (0, 4, 8, 8))
    bits.save(tmp_path / "bits.png")
    for decoded in both_decodings(tmp_path / "bits.png", size=8):
        assert_colour(decoded[:3], (0, 0, 0), tolerance=0)
        assert_colour(decoded[5:], (255, 255, 255), tolerance=0)


def test_exif_orientation_is_applied_to_a_users_photo_but_not_in_training(tmp_path):
    # Stored 200 wide and 100 tall, red above blue; orientation 6 says "turn 90 degrees clockwise to view", which
    # gives a portrait with blue on the left and red on the right.
    stored = Image.new("RGB", (200, 100), (220, 20, 20))
    stored.paste((20, 20, 220), (0, 50, 200, 100))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "phone.jpg", exif=exif, quality=95)

    upright = load_image(tmp_path / "phone.jpg", (16, 8)).permute(1, 2, 0).numpy()  # (H, W): a portrait
    assert upright.shape == (16, 8, 3)
    assert_colour(upright[:, :3], (20, 20, 220), tolerance=12)
    assert_colour(upright[:, 5:], (220, 20, 20), tolerance=12)

    as_stored, _ = decode_images([tmp_path / "phone.jpg"], (8, 16))
    as_stored = as_stored[0].permute(1, 2, 0).numpy()
    assert_colour(as_stored[:3], (220, 20, 20), tolerance=12)
    assert_colour(as_stored[5:], (20, 20, 220), tolerance=12)
    assert np.array_equal(as_stored, decode_rgb(tmp_path / "phone.jpg", (8, 16)))


def unreadable_files(folder):
    """name -> path of files that are no decodable image."""
    Image.new("RGB", (64, 64), "green").save(folder / "whole.jpg")
    Image.new("RGB", (64, 64), "green").save(folder / "whole.png")
    files = {"not an image": folder / "notes.jpg", "a folder": folder / "folder.jpg",
             "missing": folder / "missing.jpg", "truncated JPEG": folder / "cut.jpg",
             "truncated PNG": folder / "cut.png", "float pixels (mode F)": folder / "depth.tif"}
    files["not an image"].write_text("flowers are red\nviolets are blue\n")
    files["a folder"].mkdir()
    files["truncated JPEG"].write_bytes((folder / "whole.jpg").read_bytes()[:400])
    files["truncated PNG"].write_bytes((folder / "whole.png").read_bytes()[:60])
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)).save(files["float pixels (mode F)"])
    return files


def test_unreadable_files_are_refused_with_one_line_naming_the_file(tmp_path):
    for what, path in unreadable_files(tmp_path).items():
        for decode in (lambda p: decode_rgb(p, 8), lambda p: load_image(p, 8)):
            with pytest.raises(UserError) as caught:
                decode(path)
            message = str(caught.value)
            assert str(path) in message and "\n" not in message, f"{what}: {message!r}"
            if "mode F" in what:
                assert "mode F" in message


@pytest.mark.parametrize("width, height, expected", [
    (15000, 14000, "15000 x 14000 pixels (210 megapixels), more than the 200 megapixels"),
    (30000, 30000, "more than 400 megapixels, more than the 200 megapixels"),  # over what Pillow opens at all
])
def test_one_photo_size_limit_refuses_from_the_header_in_this_projects_words(tmp_path, width, height, expected,
                                                                             capsys):
    from vae_inference import main as inference_main

    path = png_header(tmp_path / "huge.png", width, height)
    for decode in (lambda p: decode_rgb(p, 8), lambda p: load_image(p, 8)):
        with pytest.raises(UserError) as caught:
            decode(path)
        assert expected in str(caught.value) and str(path) in str(caught.value), str(caught.value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning would fail here
        code = inference_main(["reconstruct", "--images", str(path), "--out", str(tmp_path / "r.png")])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and "Traceback" not in err and "DecompressionBomb" not in err, err


@pytest.mark.slow  # writes a 200-megapixel JPEG
@pytest.mark.parametrize("width, height", [(8160, 6144), (16320, 12240)])  # a phone's 50 and 200 megapixel modes
def test_phone_photos_of_50_and_200_megapixels_decode_quietly_in_draft_mode(tmp_path, width, height):
    path = tmp_path / "phone.jpg"
    Image.new("RGB", (width, height), (200, 40, 90)).save(path, quality=80)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning would fail here
        photo = load_image(path, 32)
    assert photo.shape == (3, 32, 32)
    assert_colour(photo.permute(1, 2, 0).numpy(), (200, 40, 90), tolerance=4)
    with Image.open(path) as image:  # what decode_rgb asks of libjpeg: 1/8 scale, never the whole photo
        image.draft("RGB", (64, 64))
        assert image.size == (-(-width // 8), -(-height // 8))
    # Measured, not assumed: in a fresh process, loading the photo raises the peak memory by far less than the
    # full decode would take (3 bytes a pixel: 150 MB at 50 MP, 600 MB at 200 MP).
    # The peak is the process's own VmHWM: ru_maxrss would carry over this test process's peak across the exec.
    measure = ("import re, sys; from datasets.decoding import load_image; "
               "peak = lambda: int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)); "
               "before = peak(); load_image(sys.argv[1], 32); print(peak() - before)")
    result = subprocess.run([sys.executable, "-c", measure, str(path)], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    grown_mb = int(result.stdout.split()[-1]) / 1024  # VmHWM is in KiB
    assert grown_mb < 0.25 * 3 * width * height / 1e6, grown_mb


# ------------------------------------------------------------------------------------------------- cache

def generated_root(root, count, size=48):
    """A Flowers102 root in torchvision's layout holding `count` small generated JPEGs, all in the train split."""
    folder = root / "flowers-102"
    (folder / "jpg").mkdir(parents=True)
    generator = np.random.default_rng(0)
    for i in range(1, count + 1):
        pixels = generator.integers(0, 256, size=(size // 8, size // 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((size, size)).save(folder / "jpg" / f"image_{i:05d}.jpg")
    ids = np.arange(1, count + 1)
    savemat(folder / "setid.mat", {"trnid": ids, "valid": ids[:1], "tstid": ids[:1]})
    return root


def test_a_cache_whose_image_bytes_changed_is_noticed_and_rebuilt(tmp_path, capsys):
    root = generated_root(tmp_path / "data", 6)
    images = cached_images(root, "train", 16)
    path = cache_path(root, "train", 16, flowers102_files(root, "train"))
    payload = torch.load(path, weights_only=True)
    payload["images"][3, 1, 5, 7] ^= 0x10  # one flipped bit: same key, shape and dtype, the old checksum
    torch.save(payload, path)
    capsys.readouterr()

    rebuilt = cached_images(root, "train", 16)
    notice = capsys.readouterr().err
    assert str(path) in notice and "checksum" in notice
    assert torch.equal(rebuilt, images)
    assert torch.equal(torch.load(path, weights_only=True)["images"], images), "the file must be rewritten"
    cached_images(root, "train", 16)
    assert "damaged" not in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- signals

# Builds a cache in two worker processes. Each decode is slowed down, so the test can interrupt mid-build; the
# workers are forked, so they run the slowed function too. KeyboardInterrupt ends it as the training script does.
BUILD_CACHE = """
import signal, sys, time
from datasets import cache, decoding
# As in a terminal: a process started in the background of a non-interactive shell (CI) inherits SIGINT ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)
decode = decoding.decode_rgb
def slow_decode(*args, **kwargs):
    time.sleep(0.2)  # 30 s for the whole build: the signal always arrives while it runs
    return decode(*args, **kwargs)
decoding.decode_rgb = slow_decode
try:
    cache.cached_images(sys.argv[1], "train", 16, cache_dir=sys.argv[2], num_workers=2, next_to_data=False)
except KeyboardInterrupt:
    print("interrupted before training started; nothing to save", file=sys.stderr)
    sys.exit(130)
"""


@pytest.fixture(scope="module")
def three_hundred_images(tmp_path_factory):
    return generated_root(tmp_path_factory.mktemp("signals"), 300, size=32)


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "killpg"), reason="needs POSIX process groups")
@pytest.mark.parametrize("signum, whole_group", [
    (signal.SIGINT, True),    # Ctrl-C in a terminal: every process in the foreground group gets it
    (signal.SIGTERM, False),  # kill PID: only the main process gets it
    (signal.SIGTERM, True),   # a job scheduler or container stop: the whole group gets it
], ids=["ctrl-c", "kill-main", "kill-group"])
def test_a_signal_during_the_cache_build_ends_it_promptly_without_tracebacks(three_hundred_images, tmp_path,
                                                                            signum, whole_group):
    cache_dir = tmp_path / "cache"
    # Once the progress bar has counted decoded images.
    assert_signal_ends_it_cleanly([BUILD_CACHE, str(three_hundred_images), str(cache_dir)], rb" [1-9]\d*/300 ",
                                  signum, whole_group)
    assert not list(cache_dir.glob("*.pt")), "an interrupted build must not leave a cache"


def assert_signal_ends_it_cleanly(script_and_args, ready, signum, whole_group, settle=0.0):
    """Run a script (python -c) in a session of its own, which gives it its own process group as a terminal's
    foreground job has; once its stderr matches `ready` (and `settle` seconds later) send it (or its whole group)
    the signal. It must end promptly with 130, saying there is nothing to save, with no traceback, and leave no
    process of its group behind."""
    process = subprocess.Popen([sys.executable, "-c", *script_and_args], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, start_new_session=True,
                               env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)))
    stderr = bytearray()
    reader = threading.Thread(target=collect, args=(process.stderr, stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not re.search(ready, bytes(stderr)):
            assert process.poll() is None and time.monotonic() < deadline, bytes(stderr).decode()[-2000:]
            time.sleep(0.02)
        time.sleep(settle)
        (os.killpg if whole_group else os.kill)(process.pid, signum)
        returncode = process.wait(timeout=20)  # promptly: well before the build would have finished
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    reader.join(timeout=10)
    text = bytes(stderr).decode(errors="replace")
    assert "Traceback" not in text, text[-3000:]
    assert returncode == 130 and "nothing to save" in text, (returncode, text[-2000:])
    with pytest.raises(ProcessLookupError):  # every worker has been ended and reaped, none is left over
        os.killpg(process.pid, 0)


# The first image is slow: one worker decodes it while the other, done with the rest, waits for more work holding
# the task queue's lock. No file is read: the decoder is replaced.
IDLE_WORKER = """
import signal, sys, time
import numpy as np
from datasets import decoding
signal.signal(signal.SIGINT, signal.default_int_handler)
def decode(path, resolution, exif_orientation=False, resize="squash"):
    if path == "0":
        time.sleep(60)
    if path == "127":
        print("the rest decoded", file=sys.stderr, flush=True)
    return np.zeros((4, 4, 3), np.uint8)
decoding.decode_rgb = decode
try:
    decoding.decode_images([str(i) for i in range(128)], 4, num_workers=2)
except KeyboardInterrupt:
    print("interrupted; nothing to save", file=sys.stderr)
    sys.exit(130)
"""


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "killpg"), reason="needs POSIX process groups")
def test_a_sigterm_to_the_group_that_ends_a_worker_waiting_for_work_still_ends_the_build():
    # A worker ended by SIGTERM's default action while it waits for work dies holding the task queue's lock, and
    # Pool.terminate() in the main process then waits for that lock forever. Half a second after the rest is
    # decoded, the worker has sent its last images and waits.
    assert_signal_ends_it_cleanly([IDLE_WORKER], rb"the rest decoded", signal.SIGTERM, whole_group=True, settle=0.5)


def sends_a_long_message(connection):
    decoding._worker_signals()
    connection.send_bytes(b"x" * 8_000_000)  # far more than a pipe holds: it waits for the reader
    time.sleep(60)


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_a_sigterm_in_the_middle_of_a_workers_message_ends_it_once_the_message_is_whole():
    # Ended in the middle, the worker would leave half a message, and the main process waiting for the rest.
    context = multiprocessing.get_context("fork")
    reader, writer = context.Pipe(duplex=False)
    worker = context.Process(target=sends_a_long_message, args=(writer,))
    worker.start()
    writer.close()
    try:
        assert reader.poll(60)  # the first bytes have come: the worker is in the middle of its message
        os.kill(worker.pid, signal.SIGTERM)
        time.sleep(0.2)
        assert len(reader.recv_bytes()) == 8_000_000
        worker.join(timeout=30)
    finally:
        if worker.exitcode is None:
            worker.kill()
            worker.join()
    assert worker.exitcode == 128 + signal.SIGTERM


def initialised_late():
    time.sleep(1)  # a worker not yet ready: the SIGTERM comes before its initializer has run
    decoding._worker_signals()
    time.sleep(60)


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask") or "fork" not in multiprocessing.get_all_start_methods(),
                    reason="needs fork and signal masks")
def test_a_sigterm_that_reaches_a_worker_before_its_initializer_ends_it_once_the_initializer_has_run():
    # Pool.terminate() right after the pool started (the first image corrupt, a busy machine) can reach a worker
    # still under the main process's handler; that signal must end it, neither be lost (terminate() then waits
    # forever) nor raise KeyboardInterrupt in the worker (a traceback).
    with decoding._sigterm_as_interrupt(), decoding._sigterm_held():
        worker = multiprocessing.get_context("fork").Process(target=initialised_late)
        worker.start()
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # the main process's mask is back
    os.kill(worker.pid, signal.SIGTERM)
    worker.join(timeout=30)
    if worker.exitcode is None:
        worker.kill()
        worker.join()
    assert worker.exitcode == 128 + signal.SIGTERM  # ended by the signal, once the worker's own handler was set


# ----------------------------------------------------------------------------------------------- subsets

def test_random_subset_is_seeded_and_spans_classes_sorted_lists_do_not():
    labels = torch.arange(102).repeat_interleave(10)  # 1,020 images sorted by class, as setid.mat lists them
    subset = random_subset(len(labels), 512, seed=0)
    assert len(subset) == 512 and len(set(subset.tolist())) == 512 and torch.equal(subset, subset.sort().values)
    assert torch.equal(subset, random_subset(1020, 512, seed=0))
    assert not torch.equal(subset, random_subset(1020, 512, seed=1))
    assert len(labels[subset].unique()) >= 100  # each class misses all 512 draws with probability ~0.1%
    assert len(labels[:512].unique()) == 52  # the first 512 hold half the classes
    for size in (0, 1020, 5000):
        assert torch.equal(random_subset(1020, size, seed=0), torch.arange(1020))
    with pytest.raises(UserError):
        random_subset(1020, -1, seed=0)


def test_random_subset_is_not_the_holdout_drawn_with_the_same_seed():
    held_out = holdout_split(100, 0.25, 3)[1]
    assert not torch.equal(random_subset(100, 25, seed=3), held_out)
