"""TensorBoard as a user opens it: `recipes/compare.sh` fills one HPARAMS table, and the PROJECTOR shows a
checkpoint's latent space. Each test starts `tensorboard --logdir` and asks it (its HTTP API, and the page in
headless chromium) what it shows."""

import json
import subprocess
import sys
import urllib.request

import pytest

from conftest import ONE_THREAD, REPO, TINY, browser_page, closed_port, screenshot, serve

pytestmark = pytest.mark.slow

# Four of compare.sh's nine runs (ONLY=...): each kind of line of the script, in a third of the time.
RECIPE_RUNS = ["seed-defaults", "bernoulli", "resolution-64", "cyclical-seed1"]
METRICS = ["neg_elbo_nats", "bits_per_dim", "psnr_db", "fid", "active_units", "kl_nats"]
# The five settings TensorBoard shows by default (it shows those marked as differing first, in name order).
DEFAULT_COLUMNS = ["arch", "beta", "epochs", "latent", "likelihood"]


def tensorboard(log_dir):
    port = closed_port()
    return serve([sys.executable, "-m", "tensorboard.main", "--logdir", log_dir, "--host", "127.0.0.1", "--port",
                  port], f"http://127.0.0.1:{port}/")


def hparams_api(url, route, body):
    """What TensorBoard's HPARAMS tab asks its server for (a POST of a JSON request)."""
    request = urllib.request.Request(f"{url}data/plugin/hparams/{route}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


def test_compare_sh_fills_one_hparams_table(flowers_root, tmp_path):
    log_dir = tmp_path / "recipes"
    # One epoch of each recipe on the 32-image root, no FID (the Inception test is in test_fid.py).
    result = subprocess.run(["bash", "recipes/compare.sh", flowers_root, "1", "--log-dir", log_dir,
                             "--fid-samples", "0", *TINY], cwd=REPO, env={**ONE_THREAD, "ONLY": " ".join(RECIPE_RUNS), "PYTHON": sys.executable},
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(path.name for path in log_dir.iterdir()) == sorted(RECIPE_RUNS)

    with tensorboard(log_dir) as url:
        experiment = hparams_api(url, "experiment", {"experimentName": ""})
        assert [m["name"]["tag"] for m in experiment["metricInfos"]] == [f"hparams/{m}" for m in METRICS]
        settings = [h["name"] for h in experiment["hparamInfos"]]
        assert {"likelihood", "batch_norm", "kl_schedule", "resolution", "seed", "holdout"} <= set(settings)
        assert settings[:6] == DEFAULT_COLUMNS + ["lr"]  # the table's first columns, then the others by name
        assert settings[6:] == sorted(settings[6:])
        groups = hparams_api(url, "session_groups", {
            "experimentName": "", "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE",
                                                      "STATUS_RUNNING"],
            "colParams": [], "startIndex": 0, "sliceSize": 100})["sessionGroups"]
        rows = {group["name"]: group for group in groups}
        assert sorted(rows) == sorted(RECIPE_RUNS)
        for name, row in rows.items():
            measured = {m["name"]["tag"]: m.get("value", 0.0) for m in row["metricValues"]}
            # Every held-out metric but FID, which these runs did not measure, and bits/dim, which a Bernoulli
            # decoder (a density on [0, 1], not on 256 levels) does not have.
            missing = {"fid", "bits_per_dim"} if name == "bernoulli" else {"fid"}
            assert sorted(measured) == sorted(f"hparams/{m}" for m in METRICS if m not in missing), name
            assert 0 < measured["hparams/psnr_db"] < 60 and measured["hparams/neg_elbo_nats"] > 0
        assert rows["resolution-64"]["hparams"]["resolution"] == 64
        assert rows["seed-defaults"]["hparams"]["latent"] == "10"
        assert rows["bernoulli"]["hparams"]["likelihood"] == "bernoulli"
        assert rows["cyclical-seed1"]["hparams"]["seed"] == 1

        with browser_page(url + "#hparams", width=1900) as page:
            for name in RECIPE_RUNS:  # the table in the HPARAMS tab has a row per run
                page.get_by_text(name, exact=True).first.wait_for(timeout=60_000)
            # Its columns: the default settings are ticked in the left pane, the others are not.
            ticked = {name: page.get_by_role("checkbox", name=name, exact=True).first.is_checked()
                      for name in DEFAULT_COLUMNS + ["lr", "amp", "batch_norm"]}
            assert ticked == {**{name: True for name in DEFAULT_COLUMNS}, "lr": False, "amp": False,
                              "batch_norm": False}
            screenshot(page, "hparams.jpg", full_page=False)


def test_the_projector_shows_a_checkpoints_latent_space(flowers_root, tmp_path):
    out = tmp_path / "projector"
    result = subprocess.run([sys.executable, "vae_inference.py", "projector", "--data-dir", flowers_root, "--split",
                             "train", "--log-dir", out, "--device", "cpu"], cwd=REPO, env=ONE_THREAD,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    with tensorboard(out) as url, browser_page(url + "#projector") as page:
        # The projector runs in an iframe within the plugin's iframe. pretrained/flowers32.pt has an 8 x 8 x 8
        # latent; the root's train split has 32 images.
        projector = page.frame_locator("iframe").frame_locator("iframe")
        projector.get_by_text("Points: 32").wait_for(timeout=90_000)
        projector.get_by_text("Dimension: 512").wait_for(timeout=10_000)
        page.wait_for_timeout(3000)  # the sprites load after the points
        screenshot(page, "projector.jpg", full_page=False)
