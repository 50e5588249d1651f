"""The web page (vae_demo.py): what each section returns for good and bad uploads, then the page itself served
by `python vae_demo.py` and used in a real headless Chromium (Debian's `chromium`, driven by Playwright)."""

import io
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    ONE_THREAD,
    REPO,
    browser_page,
    closed_port,
    error_line,
    png_header,
    real_flower_files,
    screenshot,
    serve,
)
from PIL import Image

import vae_demo

SCALE = 4


@pytest.fixture(scope="module")
def demo():
    """The page's model: the shipped pretrained/flowers32.pt."""
    return vae_demo.Demo(vae_demo.PRETRAINED, torch.device("cpu"), scale=SCALE)


@pytest.fixture(scope="module")
def photo():
    return str(real_flower_files(1)[0])


def side(demo):
    return demo.model.image_resolution[0] * SCALE


def pixels(picture):
    return np.asarray(picture, dtype=np.int16)


def all_different(pictures):
    arrays = [pixels(p) for p in pictures]
    return all(not np.array_equal(a, b) for i, a in enumerate(arrays) for b in arrays[i + 1:])


def decoded_alike(a, b):
    """Two pictures of one latent code decoded in batches of different sizes (a reconstruction alone, the same code
    among 8 variations or 5 path points): equal up to a level in a few of the model's pixels, not always exactly.
    PyTorch's CPU convolutions sum in an order that depends on the batch size and the thread count, so the decoded
    floats differ in their last bits (about 3e-7), and a pixel lying that close to a step of 1/255 lands on either
    side of it. About 1 photo in 40 has such a pixel (image_00001.jpg among them with 2 threads or more), whatever
    its size: the test of strength 0 compares latent codes exactly and pictures up to that rounding."""
    difference = np.abs(pixels(a) - pixels(b))[::SCALE, ::SCALE]  # one value per model pixel
    return difference.max() <= 1 and np.count_nonzero(difference) <= difference.size // 100


def vary(demo, upload, count, strength=vae_demo.inference.DEFAULT_STRENGTH, seed=0, mode=None):
    """The page's variations with a fixed seed, in the checkpoint's default mode unless one is given."""
    return demo.variations(upload, mode or demo.modes[0], count, strength, seed, True)


def save(image, folder, name, **options):
    path = Path(folder) / name
    image.save(path, **options)
    return str(path)


def test_variations_of_a_photo(demo, photo):
    seen, reconstruction, variations, message, seed = vary(demo, photo, 6, seed=0)
    assert message == "" and seed == 0
    assert seen.size == reconstruction.size == (side(demo), side(demo))
    assert len(variations) == 6 and all(v.size == seen.size for v in variations)
    assert all_different(variations)
    # What the model sees is the photo as training preprocesses it, each pixel enlarged into a SCALE x SCALE block.
    assert np.array_equal(pixels(seen)[::SCALE, ::SCALE], pixels(seen)[SCALE - 1::SCALE, SCALE - 1::SCALE])
    # A seed gives the same variations again; another seed others.
    assert not all_different([variations[0], vary(demo, photo, 6, seed=0)[2][0]])
    assert all_different([variations[0], vary(demo, photo, 6, seed=1)[2][0]])


def test_strength_zero_gives_the_reconstruction_in_every_mode(demo, photo):
    assert demo.modes == ["kind", "diffusion", "gmm", "posterior"]  # pretrained/flowers32.pt ships all three
    for mode in demo.modes:
        _, reconstruction, variations, _, _ = vary(demo, photo, 2, strength=0.0, mode=mode)
        assert all(decoded_alike(v, reconstruction) for v in variations), mode
        # The code each of them decodes is the photo's posterior mean itself.
        x, _ = vae_demo.read_upload(photo, demo.model, resize=demo.resize)
        with torch.no_grad():
            _, z, mean = vae_demo.inference.variations(demo.model, x, 2, 0.0, torch.Generator().manual_seed(0), mode,
                                                       demo.trained.samplers)
        assert torch.equal(z, mean.repeat_interleave(2, dim=0)), mode


def test_each_press_draws_a_new_seed_and_shows_it_unless_the_seed_is_fixed(demo, photo):
    first = demo.variations(photo, "diffusion", 3, 0.5, 0, False)
    second = demo.variations(photo, "diffusion", 3, 0.5, 0, False)
    assert first[4] != second[4] and all_different([first[2][0], second[2][0]])
    # The seed shown repeats its draw once fixed.
    again = demo.variations(photo, "diffusion", 3, 0.5, second[4], True)
    assert again[4] == second[4] and not all_different([again[2][0], second[2][0]])
    samples_a, _, seed_a = demo.samples("diffusion", 2, 1.0, 0)
    samples_b, _, seed_b = demo.samples("diffusion", 2, 1.0, seed_a, True)
    assert seed_a == seed_b and not all_different([samples_a[0], samples_b[0]])


def test_greyscale_and_transparent_uploads_work_with_a_note(demo, photo, tmp_path):
    grey = save(Image.open(photo).convert("L"), tmp_path, "grey.png")
    seen, _, variations, message, _ = vary(demo, grey, 2, seed=0)
    assert "grey.png is greyscale" in message and len(variations) == 2
    assert np.array_equal(pixels(seen)[..., 0], pixels(seen)[..., 2])

    rgba = Image.open(photo).convert("RGBA")
    rgba.putalpha(Image.new("L", rgba.size, 0))  # fully transparent: the model sees white
    seen, _, variations, message, _ = vary(demo, save(rgba, tmp_path, "clear.png"), 2)
    assert "clear.png has transparent parts" in message and len(variations) == 2
    assert pixels(seen).min() == 255
    # An alpha channel that is opaque everywhere is no transparency.
    opaque = save(Image.open(photo).convert("RGBA"), tmp_path, "opaque.png")
    assert vary(demo, opaque, 2, seed=0)[3] == ""


@pytest.mark.parametrize("make, expected", [
    (lambda folder: save_bytes(folder, "notes.jpg", b"shopping list: tulips, roses\n"), "notes.jpg is not an image"),
    (lambda folder: save_bytes(folder, "cut.jpg", half_a_jpeg()), "cut.jpg could not be decoded"),
    # Over the one limit of the page and the command line (200 megapixels), and over what Pillow opens at all:
    # refused from the header, never decoded.
    (lambda folder: str(png_header(Path(folder) / "poster.png", 15000, 14000)),
     "15000 x 14000 pixels (210 megapixels)"),
    (lambda folder: str(png_header(Path(folder) / "bomb.png", 30000, 30000)), "more than 400 megapixels"),
])
def test_bad_uploads_say_what_is_wrong(demo, tmp_path, make, expected):
    seen, reconstruction, variations, message, _ = vary(demo, make(tmp_path), 4)
    assert (seen, reconstruction, variations) == (None, None, [])
    assert message.startswith("**Error:** ") and expected in message and "\n" not in message


def save_bytes(folder, name, data):
    path = Path(folder) / name
    path.write_bytes(data)
    return str(path)


def half_a_jpeg():
    """The first half of a JPEG file, as an interrupted download leaves it: its header reads, its pixels do not."""
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, "JPEG")
    return buffer.getvalue()[:len(buffer.getvalue()) // 2]


def test_gradio_payloads_and_missing_uploads(demo, photo):
    # With preprocess=False the page passes Gradio's file payload; the user's own file name is the one shown.
    payload = {"path": photo, "orig_name": "my flower.jpg", "meta": {"_type": "gradio.FileData"}}
    assert len(vary(demo, payload, 3, seed=0)[2]) == 3
    assert "upload a photo first" in vary(demo, None, 3, seed=0)[3]
    assert "upload a photo B first" in demo.interpolation(photo, None, 5, False)[1]


def test_interpolation(demo, photo):
    other = str(real_flower_files(2)[1])
    for spherical in (False, True):
        path, message = demo.interpolation(photo, other, 5, spherical)
        assert message == "" and len(path) == 5 and all_different(path)
        # The ends are the two reconstructions.
        assert decoded_alike(path[0], vary(demo, photo, 1, strength=0.0, seed=0)[1])
        assert decoded_alike(path[-1], vary(demo, other, 1, strength=0.0, seed=0)[1])


def test_samples_from_each_sampler_the_checkpoint_has(demo):
    assert demo.samplers == ["prior", "gmm", "diffusion", "kind"]  # pretrained/flowers32.pt ships three
    drawn = {}
    for sampler in demo.samplers:
        images, message, _ = demo.samples(sampler, 5, 1.0, 0, True)
        assert message == "" and len(images) == 5 and all_different(images)
        assert images[0].size == (side(demo), side(demo))
        drawn[sampler] = images[0]
    assert all_different(drawn.values())
    assert "no two-stage sampler" in demo.samples("two-stage", 5, 1.0, 0, True)[1]


@pytest.mark.parametrize("call, expected", [
    (lambda d, p: vary(d, p, 1000, seed=0)[3], "number of variations must be between 1 and 32"),
    (lambda d, p: vary(d, p, 4, strength=float("nan"))[3], "strength must be between"),
    (lambda d, p: vary(d, p, 4, strength=1.5)[3], "strength must be between 0.0 and 1.0"),
    (lambda d, p: d.variations(p, "magic", 4, 0.5, 0, True)[3], "cannot make magic variations"),
    (lambda d, p: d.interpolation(p, p, 1, False)[1], "number of steps must be between 2 and 16"),
    (lambda d, p: d.samples("prior", 0, 1.0, 0, True)[1], "number of samples must be between 1 and 32"),
    (lambda d, p: d.samples("prior", 4, 1.0, 2 ** 70, True)[1], "seed must be between 0 and"),
    (lambda d, p: vary(d, p, None, seed=0)[3], "number of variations is empty: give a number between 1 and 32"),
    # What an API request may send: a number as text, a seed that is not one.
    (lambda d, p: vary(d, p, "4", seed=0)[3],
     "number of variations must be a number between 1 and 32, not the str '4'"),
    (lambda d, p: d.samples("prior", 4, 1.0, "abc", True)[1], "the seed must be a number between 0 and"),
])
def test_controls_are_checked_on_the_server(demo, photo, call, expected):
    assert expected in call(demo, photo)


def test_a_seed_that_is_not_one_is_not_shown_back(demo, photo):
    for answer in (demo.samples("prior", 4, 1.0, "abc", True), vary(demo, photo, 2, seed="abc"),
                   demo.samples("prior", 4, 1.0, 2 ** 70, True)):
        assert answer[-1] is None and "seed" in answer[-2]
    assert vary(demo, photo, 0, seed=7)[-1] == 7  # a valid seed stays in its box after another control's error


def test_an_upload_the_page_has_since_deleted_is_named_as_gone(tmp_path, photo):
    uploads = tmp_path / "uploads"
    (uploads / "abc").mkdir(parents=True)
    page = vae_demo.Demo(vae_demo.PRETRAINED, torch.device("cpu"), scale=1, folders=(uploads.resolve(),))
    kept = uploads / "abc" / "mine.jpg"
    shutil.copy(photo, kept)
    assert page.variations(str(kept), page.modes[0], 2, 0.35, 0, True)[3] == ""
    kept.unlink()  # the page's cache deletes uploads after CACHE_MINUTES
    assert "mine.jpg is no longer on this server" in page.variations(str(kept), page.modes[0], 2, 0.35, 0, True)[3]
    # Outside the upload folder (or through ".." out of it), a missing file reads like any other unreadable one.
    for elsewhere in (tmp_path / "mine.jpg", uploads / ".." / "mine.jpg"):
        answer = page.variations(str(elsewhere), page.modes[0], 2, 0.35, 0, True)[3]
        assert "mine.jpg is not an image this page can read" in answer


@pytest.mark.parametrize("args, expected", [
    (["--checkpoint", "missing.pt"], "checkpoint missing.pt does not exist"),
    (["--checkpoint", "pretrained"], "checkpoint pretrained is a folder; pass the checkpoint.pt inside"),
    (["--port", "70000"], "--port must be between 1 and 65535"),
    (["--scale", "0"], "--scale must be between 1 and 16"),
])
def test_bad_arguments_are_one_line_before_anything_is_served(args, expected, capsys):
    assert vae_demo.main(args) == 2
    assert expected in error_line(capsys.readouterr().err)


def test_without_gradio_one_line_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio raises ImportError
    assert vae_demo.main(["--port", "7860"]) == 2
    assert "pip install -r requirements-demo.txt" in error_line(capsys.readouterr().err)


# ------------------------------------------------------------------------------------ in a real browser

@pytest.fixture(scope="module")
def served_page():
    port = closed_port()
    with serve([sys.executable, "vae_demo.py", "--port", port, "--device", "cpu"], f"http://127.0.0.1:{port}") as url:
        yield url


def image_urls(page, selector):
    return page.eval_on_selector_all(f"{selector} img", "images => images.map(image => image.src)")


def png_images(page, selector, count, replacing=(), timeout=60_000):
    """The images under selector, once there are count of them and none of them is one of the urls `replacing`
    (an earlier result), fetched and decoded, asserting that each is a PNG."""
    page.wait_for_function("([selector, count, old]) => { const urls = [...document.querySelectorAll(selector + ' img')]"
                           ".map(image => image.src); return urls.length === count && !urls.some(url => "
                           "old.includes(url)); }", arg=[selector, count, list(replacing)], timeout=timeout)
    pictures = []
    for url in image_urls(page, selector):
        picture = Image.open(io.BytesIO(page.request.get(url).body()))
        assert picture.format == "PNG", url
        pictures.append(picture.convert("RGB"))
    return pictures


@pytest.mark.slow
def test_the_page_in_a_browser(served_page, tmp_path):
    # Two real photos the shipped model never trained on (the bundled examples, uploaded as files), so that the
    # screenshot shows what it does with new photos.
    photo, other = (str(path) for path in vae_demo.EXAMPLES[:2])
    with browser_page(served_page, width=1280) as page:

        # A real photo: what the model sees, its reconstruction and 8 variations (the default count) come back.
        page.locator("#photo input[type=file]").set_input_files(photo)
        variations = png_images(page, "#variations", 8)
        seen, reconstruction = png_images(page, "#seen", 1) + png_images(page, "#reconstruction", 1)
        size = (32 * SCALE, 32 * SCALE)
        assert seen.size == reconstruction.size == size and all(v.size == size for v in variations)
        assert all_different([seen, reconstruction, *variations])
        # The default mode and strength, on the controls; each press draws new flowers and shows its seed.
        assert page.locator("#mode").get_by_label("kind").is_checked()
        assert float(page.locator("#strength input[type=number]").input_value()) == vae_demo.inference.DEFAULT_STRENGTH
        seeds = [page.locator("#variations-seed input").input_value()]
        for _ in range(2):
            earlier = image_urls(page, "#variations")
            page.click("#vary")
            assert all_different(png_images(page, "#variations", 8, replacing=earlier) + variations[:1])
            page.wait_for_function("([old]) => document.querySelector('#variations-seed input').value != old",
                                   arg=[seeds[-1]])
            seeds.append(page.locator("#variations-seed input").input_value())
        assert len(set(seeds)) == 3
        last = png_images(page, "#variations", 8)
        # Strength 0 gives the reconstruction itself, eight times.
        strength = page.locator("#strength input[type=number]")
        strength.fill("0")
        strength.press("Enter")
        earlier = image_urls(page, "#variations")
        page.click("#vary")
        flat = png_images(page, "#variations", 8, replacing=earlier)
        assert all(decoded_alike(v, reconstruction) for v in flat)
        # A fixed seed repeats its draw: the seed of the second press, at the default strength, gives its images.
        strength.fill(str(vae_demo.inference.DEFAULT_STRENGTH))
        strength.press("Enter")
        page.locator("#variations-fixed input").check()
        page.locator("#variations-seed input").fill(seeds[-1])
        earlier = image_urls(page, "#variations")
        page.click("#vary")
        again = png_images(page, "#variations", 8, replacing=earlier)
        assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(again, last))
        assert page.locator("#variations-seed input").input_value() == seeds[-1]
        page.locator("#variations-fixed input").uncheck()

        # Two photos interpolated in 8 steps (the default).
        page.locator("#photo-a input[type=file]").set_input_files(photo)
        page.locator("#photo-b input[type=file]").set_input_files(other)
        page.click("#interpolate")
        path = png_images(page, "#path", 8)
        assert all(p.size == size for p in path) and all_different(path)

        # 16 samples (the default) from each sampler the shipped model has.
        first = {}
        for sampler in ("prior", "gmm", "diffusion", "kind"):
            earlier = image_urls(page, "#samples")
            page.locator("#sampler").get_by_label(sampler).check()
            page.click("#draw")
            samples = png_images(page, "#samples", 16, replacing=earlier)
            assert all(s.size == size for s in samples) and all_different(samples)
            first[sampler] = samples[0]
        assert all_different(first.values())
        # More flowers of the kind of the photo uploaded above, and a walk of the kind code around it.
        earlier = image_urls(page, "#samples")
        page.click("#more-like")
        alike = png_images(page, "#samples", 16, replacing=earlier)
        assert all(s.size == size for s in alike) and all_different(alike)
        page.click("#walk")
        walk = png_images(page, "#walk-images", 4 * vae_demo.WALK_STEPS)
        rows = [walk[row * vae_demo.WALK_STEPS:(row + 1) * vae_demo.WALK_STEPS] for row in range(4)]
        assert all(not np.array_equal(pixels(row[0]), pixels(row[-1])) for row in rows)
        screenshot(page, "demo.jpg")

        # A file that is not an image: the message shows on the page, the outputs are emptied, no traceback.
        bad = save_bytes(tmp_path, "notes.jpg", b"shopping list: tulips, roses\n")
        page.locator("#photo input[type=file]").set_input_files(bad)
        page.wait_for_selector("#variations-message >> text=notes.jpg is not an image")
        page.wait_for_function("document.querySelectorAll('#variations img').length === 0")
        assert "Traceback" not in page.content()

        # A file over the upload limit is refused by the page itself, with a message of its own.
        big = save_bytes(tmp_path, "big.jpg", bytes((vae_demo.MAX_UPLOAD_MB + 1) * 2 ** 20))
        page.locator("#photo input[type=file]").set_input_files(big)
        page.get_by_text("exceed the maximum allowed size").wait_for()

        # A bundled example photo instead: variations again, and the message is gone.
        page.locator("#examples button.gallery-item").nth(1).click()
        assert all_different(png_images(page, "#variations", 8))
        assert page.inner_text("#variations-message").strip() == ""


@pytest.mark.slow
def test_a_port_in_use_is_one_line(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = subprocess.run([sys.executable, "vae_demo.py", "--port", str(busy.getsockname()[1]), "--device",
                                 "cpu"], cwd=REPO, env=ONE_THREAD, capture_output=True, text=True, timeout=180)
    assert result.returncode == 2
    assert "pass a free --port" in error_line(result.stderr)


def test_any_training_checkpoint_serves_the_page(checkpoint, photo):
    # A seed-architecture run with a dense 10-d latent, trained by the conftest fixture.
    other = vae_demo.Demo(checkpoint, torch.device("cpu"), scale=2)
    assert other.samplers == ["prior", "gmm"] and other.modes == ["gmm", "posterior"]  # a finished run fits a GMM
    seen, _, variations, message, _ = vary(other, photo, 3, seed=0)
    assert message == "" and seen.size == (64, 64) and len(variations) == 3
    assert len(other.interpolation(photo, photo, 4, True)[0]) == 4
    assert len(other.samples("gmm", 5, 0.5, 0)[0]) == 5
    assert len(vary(other, photo, 2, mode="posterior")[2]) == 2


def resident_mb():
    """This process's resident memory in MB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no /proc/self/status on this system")


def server_peak_mb(url):
    """The peak resident memory (VmHWM) in MB of the page server serving url, found by its --port (Linux)."""
    port = url.rstrip("/").rsplit(":", 1)[1].encode()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            command = (proc / "cmdline").read_bytes().split(b"\0")
            if b"vae_demo.py" not in command or port not in command:
                continue
            status = (proc / "status").read_text()
        except OSError:  # a process that ended meanwhile
            continue
        return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024
    if Path("/proc/self/status").exists():
        pytest.fail(f"no vae_demo.py process serves {url}")
    pytest.skip("no /proc on this system")


@pytest.mark.slow
def test_eight_requests_at_once_stay_under_two_gigabytes(served_page, tmp_path):
    """Eight clients send a large photo for 32 variations each at the same moment, through Gradio's own client:
    the page computes one at a time, so the server's peak memory stays bounded and every request is answered."""
    from gradio_client import Client, handle_file

    big = tmp_path / "big.png"
    pattern = np.zeros((4000, 4000, 3), dtype=np.uint8)
    pattern[::5, ::3] = 180  # 48 MB once decoded
    Image.fromarray(pattern).save(big)
    client = Client(served_page, verbose=False)
    jobs = [client.submit(handle_file(str(big)), "diffusion", 32, 0.35, seed, True, api_name="/variations")
            for seed in range(8)]
    results = [job.result(timeout=600) for job in jobs]
    assert all(len(result[2]) == 32 and result[4] == seed for seed, result in enumerate(results))
    peak = server_peak_mb(served_page)
    print(f"peak resident memory of the page server: {peak:.0f} MB")
    assert peak < 2048


@pytest.mark.slow  # three 7000 x 7000 decodes
def test_a_huge_upload_gives_its_memory_back(demo, tmp_path):
    big = tmp_path / "big.png"
    pattern = np.zeros((7000, 7000, 3), dtype=np.uint8)
    pattern[::7, ::11] = 200  # a few hundred KB as PNG, 147 MB once decoded
    Image.fromarray(pattern).save(big, optimize=True)
    del pattern
    vary(demo, str(big), 2)  # warm: the first call allocates what every later call reuses
    before = resident_mb()
    for _ in range(2):
        seen = vary(demo, str(big), 2)[0]
        assert seen is not None
    assert resident_mb() - before < 100  # the 147 MB (and its RGBA copy) are not kept


def test_the_page_keeps_a_bounded_cache_and_computes_one_request_at_a_time(monkeypatch):
    import gradio as gr

    launched = []
    monkeypatch.setattr(gr.Blocks, "launch", lambda page, **kwargs: launched.append(page))
    assert vae_demo.main(["--port", "7999"]) == 0
    page = launched[0]
    assert page.delete_cache == (60, 60 * vae_demo.CACHE_MINUTES)  # files older than that are deleted every minute
    assert page._queue.default_concurrency_limit == 1  # the others wait their turn


def raw_call(url, api, data, timeout=60):
    """The page's API called as any HTTP client can, with a payload that names a path instead of uploading a file:
    the text of its answer's event stream."""
    import httpx

    event = httpx.post(f"{url}/gradio_api/call/{api}", json={"data": data}, timeout=timeout).json()["event_id"]
    return httpx.get(f"{url}/gradio_api/call/{api}/{event}", timeout=timeout).text


@pytest.mark.slow
def test_the_api_reads_only_uploads_and_never_waits_on_a_pipe(served_page, tmp_path):
    """A request naming a file of the server (a real photo outside Gradio's upload folder, a missing file, a named
    pipe) gets the message of any unreadable upload, and none of them is opened; a real upload then works."""
    import os
    import time

    from gradio_client import Client, handle_file

    private = tmp_path / "private.jpg"
    shutil.copy(vae_demo.EXAMPLES[0], private)
    pipe = tmp_path / "pipe.jpg"
    os.mkfifo(pipe)
    for path in (private, tmp_path / "missing.jpg", pipe):
        started = time.monotonic()
        answer = raw_call(served_page, "variations", [{"path": str(path)}, "posterior", 2, 0.35, 0, True])
        assert f"{path.name} is not an image this page can read" in answer, answer[-500:]
        assert ".png" not in answer and time.monotonic() - started < 30
        answer = raw_call(served_page, "interpolation", [{"path": str(path)}, {"path": str(private)}, 4, False])
        assert f"{path.name} is not an image this page can read" in answer, answer[-500:]
    client = Client(served_page, verbose=False)
    result = client.predict(handle_file(str(private)), "posterior", 2, 0.35, 0, True, api_name="/variations")
    assert len(result[2]) == 2
    # Through the API: an upload since deleted, a count sent as text and a seed that is not one each get their
    # own message (Gradio answers {"error": null} to a value its output cannot show).
    from gradio.utils import get_upload_folder

    deleted = Path(get_upload_folder()) / "0123abcd" / "deleted.jpg"
    answer = raw_call(served_page, "variations", [{"path": str(deleted)}, "posterior", 2, 0.35, 0, True])
    assert "deleted.jpg is no longer on this server" in answer, answer[-500:]
    example = {"path": str(vae_demo.EXAMPLES[0])}
    answer = raw_call(served_page, "variations", [example, "posterior", "4", 0.35, 0, True])
    assert "must be a number between 1 and 32, not the str '4'" in answer, answer[-500:]
    answer = raw_call(served_page, "variations", [example, "posterior", 2, 0.35, "abc", True])
    assert "the seed must be a number between 0 and" in answer and '"error": null' not in answer, answer[-500:]


def test_the_64x64_model_serves_the_page_and_the_cli_alike(photo, tmp_path, capsys):
    """`--checkpoint pretrained/flowers64.pt` works with the page and with variations, as the README says."""
    from PIL import Image as PILImage

    from vae_inference import main as inference_main

    flowers64 = vae_demo.PRETRAINED.parent / "flowers64.pt"
    page = vae_demo.Demo(flowers64, torch.device("cpu"), scale=2)
    assert page.modes[0] == "kind"  # its default, as on flowers32
    seen, reconstruction, varied, message, _ = page.variations(photo, "kind", 3, 0.35, 0, True)
    assert message == "" and len(varied) == 3 and seen.size == (128, 128) and all_different(varied)
    more, message, _ = page.more_like(photo, 2, 1.0, 0, True)
    assert message == "" and len(more) == 2
    out = tmp_path / "v.png"
    assert inference_main(["variations", "--checkpoint", str(flowers64), "--images", photo, "--num", "2",
                           "--scale", "1", "--out", str(out)]) == 0
    assert "2 kind variations" in capsys.readouterr().out
    assert PILImage.open(out).size == (2 * 66 + 2,) * 2  # the photo, its reconstruction, 2 variations: 2 x 2
