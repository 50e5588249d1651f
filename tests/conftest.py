"""Shared fixtures and helpers: a small Flowers102-format root built from real images, a checkpoint trained
in-process, the scripts run as a user runs them, and TensorBoard's own event reader.

Tests that start a subprocess (a script, torchrun, the notebook, a server) are marked `slow`:
`python -m pytest -m "not slow" -q` is the quick edit-test loop, `python -m pytest -q` runs everything."""

import contextlib
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

# Tiny models gain nothing from several threads, and OpenMP threads that spin while other processes hold the
# cores slow a test down many times over; children (the CLI runs) inherit the setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
from scipy.io import loadmat, savemat

REPO = Path(__file__).resolve().parent.parent
# One thread per child process: several share two cores, and oversubscribed threads slow them all down.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# The smallest sensible training run on the 32-image root: 4 steps an epoch.
# --threads 1: a run that times its thread count may pick another count than the run it is compared with, and
# floating-point sums then differ in their last bits.
TINY = ["--batch-size", "8", "--eval-size", "0", "--grid-size", "4", "--num-workers", "1", "--device", "cpu",
        "--checkpoint-every", "0", "--threads", "1"]
SHARED_FLOWERS = REPO.parent / "shared" / "data" / "flowers102-train" / "flowers-102"
# Real photos, in order of preference: the shared subset beside the repository (as in CI), or a Flowers102
# download in the default --data-dir. Without either, photo-like JPEGs are generated so the suite still runs.
PHOTO_FOLDERS = [SHARED_FLOWERS / "jpg", REPO / "datasets" / "flowers-102" / "jpg"]


def real_flower_files(count):
    return real_photos(count) or generated_photos(count)


def real_photos(count):
    """count real Flowers102 JPEGs, or [] where none are at hand: the train split's first, in setid.mat's order."""
    for folder in PHOTO_FOLDERS:
        files = photos_train_first(folder)
        if len(files) >= count:
            return files[:count]
    return []


def photos_train_first(folder):
    """The photos of a Flowers102 jpg/ folder, those of the train split (setid.mat's trnid, beside the folder)
    first, then the others in name order; all in name order where there is no setid.mat. The shared subset keeps
    its train and val photos at full size but its test photos resized to 176 px on the short side (image_00001.jpg
    is one of them): a test that compares preprocessing with torchvision's needs photos as Flowers102 has them."""
    files = sorted(folder.glob("image_*.jpg"))
    setid = folder.parent / "setid.mat"
    if not setid.is_file():
        return files
    present = {file.name: file for file in files}
    train = [present[name] for name in (f"image_{int(i):05d}.jpg"
                                        for i in np.atleast_1d(loadmat(setid, squeeze_me=True)["trnid"]))
             if name in present]
    chosen = set(train)
    return train + [file for file in files if file not in chosen]


def generated_photos(count):
    """Flower-like JPEGs: a coloured disc on a darker textured background, of assorted sizes and aspect ratios
    (the same ones every time, kept in a temp folder)."""
    from PIL import Image, ImageDraw, ImageFilter

    folder = Path(tempfile.gettempdir()) / f"vae-flowers-test-photos-{os.getuid()}"
    folder.mkdir(exist_ok=True)
    files = []
    for i in range(count):
        path = folder / f"photo_{i:05d}.jpg"
        if not path.exists():
            generator = np.random.default_rng(i)
            width, height = int(generator.integers(300, 700)), int(generator.integers(300, 700))
            background = generator.integers(0, 120, size=(12, 16, 3), dtype=np.uint8)
            image = Image.fromarray(background).resize((width, height), Image.BICUBIC)
            radius = generator.uniform(0.2, 0.45) * min(width, height)
            cx, cy = generator.uniform(0.3, 0.7) * width, generator.uniform(0.3, 0.7) * height
            petals = tuple(int(c) for c in generator.integers(60, 256, size=3))
            ImageDraw.Draw(image).ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=petals)
            image.filter(ImageFilter.GaussianBlur(3)).save(path, quality=90)
        files.append(path)
    return files


def make_flowers_root(root, train=32, val=8, test=8, classes=102):
    """A Flowers102 root in torchvision's layout with real JPEGs and its own setid.mat/imagelabels.mat: image i
    is of class i % classes + 1."""
    folder = Path(root) / "flowers-102"
    (folder / "jpg").mkdir(parents=True)
    sources = real_flower_files(train + val + test)
    for new_id, source in enumerate(sources, start=1):
        shutil.copy(source, folder / "jpg" / f"image_{new_id:05d}.jpg")
    ids = np.arange(1, len(sources) + 1)
    savemat(folder / "setid.mat", {"trnid": ids[:train], "valid": ids[train:train + val],
                                   "tstid": ids[train + val:]})
    savemat(folder / "imagelabels.mat", {"labels": (ids % classes) + 1})
    return Path(root)


def closed_port():
    """A loopback port where nothing listens: a download pointed at it fails at once, offline or not."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def flowers_root(tmp_path_factory):
    return make_flowers_root(tmp_path_factory.mktemp("flowers"))


def run_script(script, *args, timeout=300, env=None):
    """A repository script in a fresh process, as a user runs it: the CompletedProcess (text output)."""
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=REPO, env=env or ONE_THREAD,
                          capture_output=True, text=True, timeout=timeout)


def train(*args):
    """vae_training.py's main() in this process (no interpreter start-up): asserts it exits 0."""
    import vae_training

    code = vae_training.main([str(a) for a in args])
    assert code == 0, f"vae_training.py exited {code}"


def load_events(folder):
    """Everything TensorBoard would show of one run folder, read by TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    accumulator.Reload()
    return accumulator


def collect(pipe, into):
    """Append what the pipe delivers to `into` until it closes (in a thread of its own: reading blocks)."""
    while chunk := os.read(pipe.fileno(), 4096):
        into.extend(chunk)


def error_line(stderr):
    """The one `error:` line of a failed command's stderr (tqdm's carriage-return lines aside); asserts there is
    exactly one and no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [line[line.index("error: "):] for line in stderr.replace("\r", "\n").splitlines() if "error: " in line]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture(scope="session")
def checkpoint(flowers_root, tmp_path_factory):
    """A 32x32 model trained for 12 steps at a high learning rate: enough for its latents to carry signal."""
    log_dir = tmp_path_factory.mktemp("trained")
    train("--data-dir", flowers_root, "--epochs", 3, "--lr", 1e-2, "--log-dir", log_dir, "--run-name", "t",
          *TINY)
    return log_dir / "t" / "checkpoint.pt"


# ------------------------------------------------------------------------------ servers and a real browser

@contextlib.contextmanager
def serve(command, url, timeout=180):
    """A server command (the web page, TensorBoard) as a user starts it, from the repository root: yields url
    once the server prints it, and stops the server after."""
    server = subprocess.Popen([str(part) for part in command], cwd=REPO, env=ONE_THREAD, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    lines, deadline = [], time.monotonic() + timeout
    try:
        while url not in "".join(lines[-1:]):
            line = server.stdout.readline()
            if not line and server.poll() is not None:
                pytest.fail(f"{command[1]} exited {server.returncode} before serving:\n{''.join(lines)}")
            if time.monotonic() > deadline:
                pytest.fail(f"{command[1]} did not serve {url} within {timeout} s:\n{''.join(lines)}")
            lines.append(line)
        # Keep reading what it prints, so a full pipe never blocks it.
        threading.Thread(target=server.stdout.read, daemon=True).start()
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def chromium():
    """Debian's chromium (.ci/run installs it), or the Chrome/Chromium binary CHROMIUM names."""
    found = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("no chromium on PATH: .ci/run installs Debian's chromium package")
        pytest.skip("no chromium: apt-get install chromium (or set CHROMIUM=/path/to/chrome) to run the browser tests")
    return found


@contextlib.contextmanager
def browser_page(url, width=1400, height=900):
    """A Playwright page in headless chromium at url. Asserts on the way out that the page only ever asked the
    loopback address for anything (no fonts, scripts or analytics from the internet)."""
    from playwright.sync_api import sync_playwright

    outside = []
    with sync_playwright() as playwright:
        # SwiftShader: WebGL (TensorBoard's projector) drawn on the CPU; there is no GPU here.
        browser = playwright.chromium.launch(executable_path=chromium(), args=[
            "--no-sandbox", "--disable-dev-shm-usage", "--disable-background-networking",
            "--use-angle=swiftshader", "--enable-unsafe-swiftshader"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.on("request", lambda request: None if LOOPBACK.match(request.url) else outside.append(request.url))
            page.goto(url)
            yield page
        finally:
            browser.close()
    assert outside == [], f"requests beyond the loopback address: {outside}"


LOOPBACK = re.compile(r"(https?://(127\.0\.0\.1|localhost)[:/]|data:|blob:|about:)")


def screenshot(page, name, full_page=True):
    """With VAE_SCREENSHOTS=FOLDER, the page is saved there as a JPEG (the README's pictures are made so)."""
    folder = os.environ.get("VAE_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / name), full_page=full_page, quality=80)


def png_header(path, width, height):
    """A PNG whose header claims width x height and holds no pixels: any reader that decodes it fails, so a
    refusal by size must come from the header alone."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path
