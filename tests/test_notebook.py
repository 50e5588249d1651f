"""experiments.ipynb runs top to bottom on a small Flowers102 root."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_notebook_executes(flowers_root, monkeypatch):
    monkeypatch.setenv("VAE_DATA_DIR", str(flowers_root))
    notebook = nbformat.read(REPO / "experiments.ipynb", as_version=4)
    NotebookClient(notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3  # data, the grids, the shipped model's
    text = "".join(o.get("text", "") for o in outputs)
    assert "65,831 parameters" in text and "epoch 5:" in text
    assert "samplers: gmm, diffusion" in text and "bits/dim" in text  # the shipped model's section
