"""Every numeric flag of both scripts with negative, zero, NaN, infinite and huge values: each value either
works or ends in one `error:` line that names the flag, never a traceback."""

import dataclasses

import pytest

from conftest import TINY, error_line
from vae.config import TrainConfig, flag_name
import vae_inference
import vae_training

pytestmark = pytest.mark.slow  # about a hundred short runs

BAD_VALUES = ["-1", "0", "nan", "inf", "huge", "beyond-float32"]
NUMERIC_TRAINING_FLAGS = [f.name for f in dataclasses.fields(TrainConfig) if f.type in (int, float, list)]


def as_text(value, kind):
    if value == "beyond-float32":  # finite in Python, infinite in the float32 arithmetic of training
        return "1e39" if kind is float else str(10 ** 39)
    return ("1e30" if kind is float else str(10 ** 12)) if value == "huge" else value


def outcome(main, args, capsys):
    """(exit code, stderr) of main(args); argparse's own errors exit through SystemExit."""
    capsys.readouterr()
    try:
        code = main(args)
    except SystemExit as exit:
        code = exit.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("value", BAD_VALUES)
@pytest.mark.parametrize("name", NUMERIC_TRAINING_FLAGS)
def test_training_flags(name, value, flowers_root, tmp_path, capsys):
    kind = TrainConfig.__dataclass_fields__[name].type
    text = as_text(value, float if kind is float else int)
    values = [text] * 3 if name == "latent_shape" else [text]
    extra = ["--arch", "resnet", "--width", "8"] if name == "latent_shape" else []
    args = ["--data-dir", str(flowers_root), "--log-dir", str(tmp_path), "--run-name", "r", "--epochs", "1",
            "--max-steps", "1", "--eval-split", "none", *TINY, *extra, flag_name(name), *values]
    code, stderr = outcome(vae_training.main, args, capsys)
    assert code in (0, 2), stderr
    if code == 2:
        line = error_line(stderr)
        assert flag_name(name) in line or (name in ("lr", "beta") and "--lr" in line), line


INFERENCE_FLAGS = {  # command -> its numeric flags (besides the shared --seed and --scale)
    "sample": ["num", "temperature", "nrow"],
    "reconstruct": ["num", "nrow", "holdout", "holdout_seed"],
    "variations": ["num", "strength"],
    "interpolate": ["steps"],
    "traverse": ["range", "steps"],
    "evaluate": ["iw_samples", "batch_size", "holdout", "holdout_seed"],
}
FLOATS = {"temperature", "range", "holdout", "strength"}
CASES = [(command, name) for command, names in INFERENCE_FLAGS.items()
         for name in names + ["seed"] + (["scale"] if command != "evaluate" else [])]


@pytest.mark.parametrize("value", BAD_VALUES)
@pytest.mark.parametrize("command, name", CASES)
def test_inference_flags(command, name, value, checkpoint, flowers_root, tmp_path, capsys):
    image = str(next((flowers_root / "flowers-102" / "jpg").glob("*.jpg")))
    inputs = {"variations": ["--image", image], "interpolate": ["--images", image, image],
              "reconstruct": ["--data-dir", str(flowers_root), "--split", "val"],
              "evaluate": ["--data-dir", str(flowers_root), "--split", "val", "--iw-samples", "2"]}.get(command, [])
    out = [] if command == "evaluate" else ["--out", str(tmp_path / "out.png")]
    text = as_text(value, float if name in FLOATS else int)
    args = [command, "--checkpoint", str(checkpoint), *inputs, *out, f"--{name.replace('_', '-')}", text]
    code, stderr = outcome(vae_inference.main, args, capsys)
    assert code in (0, 2), stderr
    if code == 2:
        assert f"--{name.replace('_', '-')}" in error_line(stderr)
