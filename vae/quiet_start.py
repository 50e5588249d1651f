"""Ctrl-C while a script loads its libraries (PyTorch takes a second or more) exits at once with one line.

Without this, an interrupt during the imports prints a traceback from deep inside one of them, or is swallowed
by a library that catches everything while it imports, and the run goes on as if nothing was pressed. Each script
imports this module first; the handler is installed only when that script is the program being run (not when
tests or a notebook import it), and `loaded()` hands Ctrl-C back to Python before the script's main() starts,
whose own handling (a saved checkpoint and its resume command, in training) then applies.
"""

import os
import signal
import sys
from pathlib import Path

SCRIPTS = ("vae_training.py", "vae_inference.py", "vae_demo.py")


def _exit_at_once(signum, frame):
    sys.stderr.write("\ninterrupted while loading: nothing was started or written\n")
    os._exit(128 + signum)  # no clean-up to run, and no library code left to run it


def _run_as_a_script():
    return Path(getattr(sys.modules.get("__main__"), "__file__", None) or "").name in SCRIPTS


def loaded():
    """Ctrl-C raises KeyboardInterrupt again, as Python's default does."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


if _run_as_a_script() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _exit_at_once)
