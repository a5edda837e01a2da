"""Screenshots of the lab server's web page for docs/server.md.

Starts a server on a fresh data directory with an ordinary key and an admin key, fits a
small NODDI phantom through the page, and saves each screen (sign-in with a wrong key,
submit with the in-page checks, jobs, viewer, admin, and the viewer and jobs on a
390-px-wide phone screen) as small palette PNGs.

    python3 scripts/web_screenshots.py [--out docs/images]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = parser.parse_args()

    from server_helpers import ServerProcess, make_keys, write_phantom
    from web_helpers import browser_unavailable, take_screenshots

    reason = browser_unavailable()
    if reason:
        print(f"cannot make screenshots: {reason}")
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        keys = make_keys(data_dir)
        inputs = write_phantom(Path(tmp) / "phantom", shape=(16, 16, 5))
        server = ServerProcess(data_dir).start()
        try:
            for path in take_screenshots(server.url, keys, inputs, args.out):
                print(f"{path} ({path.stat().st_size / 1024:.0f} KiB)")
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
