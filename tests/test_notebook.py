"""experiments.ipynb runs top to bottom through `jupyter nbconvert`, as its first cell says: on a small Flowers102
root, and from a fresh clone with no data at all."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def execute(tmp_path, data_dir=None):
    """The executed notebook's code-cell outputs, run the README's way."""
    env = {key: value for key, value in os.environ.items() if key != "VAE_DATA_DIR"}
    if data_dir is not None:
        env["VAE_DATA_DIR"] = str(data_dir)
    out = tmp_path / "executed.ipynb"
    result = subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute",
                             "experiments.ipynb", "--output", str(out), "--ExecutePreprocessor.timeout=300"],
                            cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    notebook = json.loads(out.read_text())
    return [output for cell in notebook["cells"] if cell["cell_type"] == "code" for output in cell.get("outputs", [])]


def text_of(outputs):
    return "".join("".join(o.get("text", "")) for o in outputs)


@pytest.mark.slow
def test_notebook_executes_on_flowers102(flowers_root, tmp_path):
    outputs = execute(tmp_path, flowers_root)
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3  # data, the grids, the shipped model's
    text = text_of(outputs)
    assert "65,831 parameters" in text and "epoch 5:" in text and "drawn flowers" not in text
    assert "samplers: prior, gmm, diffusion" in text and "bits/dim" in text  # the shipped model's section


@pytest.mark.slow
def test_notebook_executes_from_a_fresh_clone_without_data(tmp_path):
    outputs = execute(tmp_path, tmp_path / "no-data-here")
    text = text_of(outputs)
    assert "using 512 drawn flowers instead" in text and "first code cell" in text and "--data-dir" not in text
    assert "torch.Size([512, 3, 32, 32])" in text and "epoch 5:" in text
