"""Writing a file whole or not at all: the new content goes to a temporary file beside the target, reaches the disk,
and only then replaces the target by a rename. A full disk, an error or an interrupt in the middle leaves the old
file as it was, and no temporary file behind. Checkpoints (vae/checkpoint.py) are written the same way."""

import errno
import os
import tempfile
from pathlib import Path

# What a write that ran out of room raises: no space left, or the user's quota used up.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


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
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError) and error.filename in (None, temporary):
            error.filename = str(path)  # the file the user knows, not its temporary twin
        raise


def write_text_atomically(path, text):
    replace_atomically(path, lambda temporary: Path(temporary).write_text(text))


def disk_full(error):
    return isinstance(error, OSError) and error.errno in DISK_FULL


def write_failure(error, path=None):
    """'cannot write PATH (the disk is full: No space left on device)': one line for the error of a write (an
    OSError, or what a library's writer raised instead); path: the file or folder meant, when the error has none."""
    path = getattr(error, "filename", None) or path
    reason = getattr(error, "strerror", None) or str(error)
    if disk_full(error):
        reason = f"the disk is full: {reason}"
    return f"cannot write {path or 'a file'} ({reason})"
