"""Imported by the first line of every command-line entry point (``training/{dewa,ssl,supervised}.py``, ``scripts/``).

``python training/ssl.py`` (also under ``accelerate launch``) puts the script's own folder first on ``sys.path``. There,
``training/ssl.py`` shadows the standard library's ``ssl`` for every later import (urllib, requests, huggingface_hub,
...), and ``scripts/evaluate.py`` shadows the ``evaluate`` library. Importing this module removes the running script's
folder from ``sys.path`` before anything else is imported; the project's own code is imported as the ``training`` and
``modeling_dearli`` packages (installed with ``pip install -e .``, or on ``PYTHONPATH``). It does nothing when the
entry point is imported as a module (tests, ``python -m training.ssl``). A script of another checkout than the installed
one (a second clone next to an editable install) gets the same treatment and a warning that the installed checkout's
code is what runs.

It also sets how progress bars write into a log file: when stderr is not a terminal (``cmd > log 2>&1``), tqdm
redraws a bar at most once a minute (``TQDM_MININTERVAL``, read when tqdm is first imported; a value in the
environment wins), so that the log holds the periodic log lines rather than one redraw per step.
"""

import os
import sys

# Seconds between two redraws of a progress bar written to a file.
LOG_FILE_BAR_INTERVAL = 60
if not (sys.stderr is not None and sys.stderr.isatty()):
    os.environ.setdefault("TQDM_MININTERVAL", str(LOG_FILE_BAR_INTERVAL))

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _checkout_of(folder: str) -> str | None:
    """The project checkout (a folder holding ``training/`` and ``modeling_dearli/``) that `folder` is inside."""
    for _ in range(4):
        if all(os.path.isdir(os.path.join(folder, name)) for name in ("training", "modeling_dearli")):
            return folder
        parent = os.path.dirname(folder)
        if parent == folder:
            return None
        folder = parent
    return None


_script = getattr(sys.modules.get("__main__"), "__file__", None)
if _script:
    _script_dir = os.path.dirname(os.path.abspath(_script))
    _checkout = _checkout_of(_script_dir)
    if _checkout is not None and _script_dir != _checkout:
        sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _script_dir]
        if os.path.realpath(_checkout) != os.path.realpath(_REPO_ROOT):
            # e.g. a second clone next to an editable install of the first: the code that runs is the installed one's
            sys.stderr.write(f"warning: {_script} runs the project code of {_REPO_ROOT} (the installed checkout), not "
                             f"of {_checkout}; for the latter, run with PYTHONPATH={_checkout} or pip install -e "
                             f"{_checkout}\n")
