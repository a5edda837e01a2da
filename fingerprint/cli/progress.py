"""Progress bars and path display of the command line (tqdm on stderr)."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["progress_bar", "shown_path"]


def shown_path(path: str | os.PathLike) -> str:
    """How the command line prints a path: relative to the current directory when it is
    inside it, absolute otherwise (the same rule for every path a command prints)."""
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(Path.cwd().resolve())) or "."
    except ValueError:
        return str(resolved)


def progress_bar(desc: str, enabled: bool = True):
    """(closer, callback): a tqdm bar on stderr drawn on the first call of the callback.

    Until ``closer.close()``, log records are written through tqdm, so that a record and
    the bar never share a line."""
    if not enabled:
        return None, None
    # lazy: keeps tqdm off import
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    holder: dict[str, Any] = {}
    stack = contextlib.ExitStack()
    stack.enter_context(logging_redirect_tqdm())

    def progress(fraction: float) -> None:
        bar = holder.get("bar")
        if bar is None and fraction <= 0:
            return  # nothing drawn before the work starts (errors stay one line)
        if bar is None:
            bar = holder["bar"] = tqdm(
                total=1000, desc=desc, file=sys.stderr,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}")
        target = int(round(fraction * 1000))
        if target > bar.n:
            bar.update(target - bar.n)

    class _Closer:
        def close(self) -> None:
            if "bar" in holder:
                holder["bar"].close()
            stack.close()

    return _Closer(), progress
