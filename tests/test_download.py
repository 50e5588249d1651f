"""Flowers102's download path, against a loopback HTTP server that serves a small archive in its format.

Only 127.0.0.1 is contacted: torchvision's URL prefix points at the local server (or at a port where
nothing listens) and its md5 table at the served files.
"""

import functools
import hashlib
import json
import subprocess
import sys
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.io import savemat

from conftest import ONE_THREAD as ENV
from conftest import REPO, closed_port, real_flower_files

pytestmark = pytest.mark.slow
TINY = ["--batch-size", "8", "--eval-size", "0", "--grid-size", "4", "--num-workers", "1", "--device", "cpu",
        "--epochs", "1", "--max-steps", "3"]
TRAIN, TEST = 24, 8

# The real training script with only torchvision's download URL and md5 table replaced.
WRAPPER = """
import json, runpy, sys
from torchvision.datasets import Flowers102
Flowers102._download_url_prefix = sys.argv.pop(1)
Flowers102._file_dict = {key: tuple(value) for key, value in json.loads(sys.argv.pop(1)).items()}
sys.argv[0] = "vae_training.py"
runpy.run_path("vae_training.py", run_name="__main__")
"""


def md5(path):
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # torchvision's redirect check closes a GET unread: the broken pipe is expected, not a test failure


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    """(URL prefix, md5 table in torchvision's _file_dict form) of a loopback Flowers102 mirror."""
    served = tmp_path_factory.mktemp("mirror")
    with tarfile.open(served / "102flowers.tgz", "w:gz") as archive:
        for i, source in enumerate(real_flower_files(TRAIN + TEST), start=1):
            archive.add(source, arcname=f"jpg/image_{i:05d}.jpg")
    ids = np.arange(1, TRAIN + TEST + 1)
    savemat(served / "setid.mat", {"trnid": ids[:TRAIN], "valid": ids[TRAIN:TRAIN + 2], "tstid": ids[TRAIN:]})
    savemat(served / "imagelabels.mat", {"labels": ids % 102 + 1})
    server = QuietServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    files = {"image": "102flowers.tgz", "label": "imagelabels.mat", "setid": "setid.mat"}
    yield f"http://127.0.0.1:{server.server_address[1]}/", {key: (name, md5(served / name))
                                                             for key, name in files.items()}
    server.shutdown()
    server.server_close()


def start(prefix, file_dict, *args):
    return subprocess.Popen([sys.executable, "-c", WRAPPER, prefix, json.dumps(file_dict), *map(str, args)],
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def one_error_line(stderr):
    lines = [line[line.index("error: "):] for line in stderr.replace("\r", "\n").splitlines() if "error: " in line]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.fixture
def main_offline(monkeypatch, capsys):
    """Call the CLI's main() in this process with torchvision pointed at (prefix, file_dict)."""
    from torchvision.datasets import Flowers102

    import vae_training

    def call(prefix, file_dict, *args):
        monkeypatch.setattr(Flowers102, "_download_url_prefix", prefix)
        monkeypatch.setattr(Flowers102, "_file_dict", file_dict)
        capsys.readouterr()
        code = vae_training.main([str(arg) for arg in args])
        return code, capsys.readouterr().err

    return call


def test_a_bad_download_is_reported_and_never_used(mirror, main_offline, tmp_path):
    prefix, good = mirror
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    target = data_dir / "flowers-102"
    args = ["--data-dir", data_dir, "--log-dir", tmp_path / "runs", *TINY]

    # The archive's checksum is wrong: it is deleted unextracted.
    bad_archive = {**good, "image": ("102flowers.tgz", "0" * 32)}
    code, err = main_offline(prefix, bad_archive, *args)
    line = one_error_line(err)
    assert code == 2 and "checksum mismatch for 102flowers.tgz" in line and str(target) in line, line
    assert not (target / "jpg").exists() and not list(data_dir.rglob("102flowers.tgz"))

    # The archive is fine but setid.mat is not: the extracted images must not become a data set that looks
    # complete, so a second run downloads again instead of training on it.
    bad_setid = {**good, "setid": ("setid.mat", "0" * 32)}
    for attempt in range(2):
        code, err = main_offline(prefix, bad_setid, *args)
        line = one_error_line(err)
        assert code == 2 and "checksum mismatch for setid.mat" in line, line
        assert not (target / "setid.mat").exists() and not (target / "jpg").exists()
        assert "training on" not in err
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("checkpoint.pt"))


def test_an_empty_data_dir_downloads_and_trains(mirror, tmp_path):
    prefix, good = mirror
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    # Run beside it: no server at all. That must fail fast and say what to do by hand.
    offline_dir = tmp_path / "offline"
    offline_dir.mkdir()
    downloading = start(prefix, good, "--data-dir", data_dir, "--log-dir", tmp_path / "runs", "--run-name", "dl",
                        *TINY)
    offline = start(f"http://127.0.0.1:{closed_port()}/", good, "--data-dir", offline_dir, "--log-dir",
                    tmp_path / "runs", *TINY)
    out, err = offline.communicate(timeout=120)  # offline fails within the 60 s network timeout, never hangs
    line = one_error_line(err)
    assert offline.returncode == 2
    assert str(offline_dir / "flowers-102") in line and "could not be downloaded" in line, line
    for name, _ in good.values():
        assert name in line, line
    assert "by hand" in line and "--data-dir" in line, line

    out, err = downloading.communicate(timeout=180)
    assert downloading.returncode == 0, err[-3000:]
    assert f"training on {TRAIN} images" in out
    target = data_dir / "flowers-102"
    assert len(list((target / "jpg").glob("image_*.jpg"))) == TRAIN + TEST
    assert md5(target / "setid.mat") == good["setid"][1] and md5(target / "imagelabels.mat") == good["label"][1]
    assert not (data_dir / ".flowers-102-download").exists(), "the download's staging folder was left behind"
    assert torch.load(tmp_path / "runs" / "dl" / "checkpoint.pt", weights_only=True)["step"] == 3


def test_inference_without_the_data_says_what_works_without_it(monkeypatch, checkpoint, tmp_path, capsys):
    from torchvision.datasets import Flowers102

    import vae_inference

    monkeypatch.setattr(Flowers102, "_download_url_prefix", f"http://127.0.0.1:{closed_port()}/")
    empty = tmp_path / "empty"
    empty.mkdir()
    for command in ("reconstruct", "evaluate"):
        assert vae_inference.main([command, "--checkpoint", str(checkpoint), "--data-dir", str(empty)]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert "could not be downloaded" in line and "reconstruct --images PHOTO" in line, line
