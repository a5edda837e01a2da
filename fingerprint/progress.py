"""Progress bars the library shows on its own (long dictionary builds).

When the caller passes no progress callback, a long piece of work such as building a
dictionary inside ``model.fit`` draws a progress bar, but only

* when it runs in an interactive terminal (standard error is a TTY) or a Jupyter
  notebook, never in batch jobs, pipes or log files, and
* once it has lasted :data:`DELAY_SECONDS` (quick work draws nothing).

``FINGERPRINT_PROGRESS`` (``auto``, the default; ``always``; ``never``) or
:func:`set_progress` overrides the choice. While a bar is drawn, log records go through
tqdm so that they never share a line with it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["DELAY_SECONDS", "MODES", "library_progress", "progress_mode", "set_progress"]

#: Seconds of work after which a library progress bar appears.
DELAY_SECONDS = 3.0
#: Accepted values of ``FINGERPRINT_PROGRESS`` and :func:`set_progress`.
MODES = ("auto", "always", "never")

_mode: str | None = None


def set_progress(mode: str | None) -> None:
    """Choose when the library draws progress bars: ``'auto'`` (interactive terminals and
    notebooks), ``'always'``, ``'never'``; None goes back to ``FINGERPRINT_PROGRESS``."""
    global _mode
    if mode is not None and mode not in MODES:
        raise ValueError(f"progress mode must be one of {', '.join(MODES)}; got {mode!r}")
    _mode = mode


def progress_mode() -> str:
    """The mode in force: :func:`set_progress`'s, else ``FINGERPRINT_PROGRESS``, else
    ``'auto'`` (an unknown environment value counts as ``'auto'``)."""
    if _mode is not None:
        return _mode
    env = os.environ.get("FINGERPRINT_PROGRESS", "auto").strip().lower()
    return env if env in MODES else "auto"


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    if shell is None or "ipykernel" not in sys.modules:
        return False
    try:
        ip = shell.get_ipython()
    except Exception:  # pragma: no cover - unusual IPython
        return False
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"


def _interactive() -> bool:
    stream = sys.stderr
    try:
        tty = bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):
        tty = False
    return tty or _in_notebook()


def _enabled() -> bool:
    mode = progress_mode()
    return mode == "always" or (mode == "auto" and _interactive())


@contextlib.contextmanager
def library_progress(desc: str, progress: Callable[[float], Any] | None
                     ) -> Iterator[Callable[[float], Any] | None]:
    """The caller's ``progress`` callback when it gave one; otherwise, when progress bars
    are enabled, a callback drawing a tqdm bar (after :data:`DELAY_SECONDS`) with log
    records routed around it; otherwise None."""
    if progress is not None or not _enabled():
        yield progress
        return
    if _in_notebook():
        from tqdm.auto import tqdm  # lazy: keeps tqdm off import
    else:
        # lazy: keeps tqdm off import
        from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    bar = tqdm(total=1000, desc=desc, file=sys.stderr, delay=DELAY_SECONDS, leave=False,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}")

    def callback(fraction: float) -> None:
        target = int(round(min(max(float(fraction), 0.0), 1.0) * 1000))
        if target > bar.n:
            bar.update(target - bar.n)

    try:
        with logging_redirect_tqdm():
            yield callback
    finally:
        bar.close()
