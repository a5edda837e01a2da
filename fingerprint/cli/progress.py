"""Progress bars of the command line (tqdm on stderr)."""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["progress_bar"]


def progress_bar(desc: str, enabled: bool = True):
    """(closer, callback): a tqdm bar on stderr drawn on the first call of the callback."""
    if not enabled:
        return None, None
    from tqdm import tqdm

    holder: dict[str, Any] = {}

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

    return _Closer(), progress
