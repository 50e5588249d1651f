"""Writing a file whole or not at all: the new content goes to a temporary file beside the target, reaches the disk,
and only then replaces the target by a rename. A full disk, an error or an interrupt in the middle leaves the old
file as it was, and no temporary file behind. Checkpoints (vae/checkpoint.py) are written the same way."""

import os
import tempfile
from pathlib import Path


def replace_atomically(path, write):
    """Call write(temporary_path) to write the new content of `path`, then rename it over `path`. Errors from write
    or from the disk propagate after the temporary file is removed. Creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(temporary)
        with open(temporary, "rb+") as file:
            os.fsync(file.fileno())  # the bytes reach the disk before the rename makes them the file
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_text_atomically(path, text):
    replace_atomically(path, lambda temporary: Path(temporary).write_text(text))
