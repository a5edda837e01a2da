"""Write a simulated NODDI phantom (NIfTI DWI, FSL bval/bvec, mask, ground-truth maps).

    python scripts/phantom.py --out phantom [--shape 16 16 4] [--snr 30] [--seed 0]
        [--bval scheme.bval --bvec scheme.bvec] [--prefix sub-01] [--background 2]

Without --bval/--bvec the package's built-in multi-shell scheme is used.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--shape", type=int, nargs=3, default=(16, 16, 4), metavar=("X", "Y", "Z"))
    p.add_argument("--snr", type=float, default=30.0, help="SNR of b=0 (0: no noise)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefix", default="sub-01")
    p.add_argument("--background", type=int, default=0,
                   help="zero-signal voxels outside the mask on each side of x and y")
    p.add_argument("--bval", type=Path, help="FSL bval file (s/mm²) of the scheme")
    p.add_argument("--bvec", type=Path, help="FSL bvec file of the scheme")
    args = p.parse_args(argv)

    from fingerprint.phantoms import noddi_phantom, write_phantom

    scheme = None
    if (args.bval is None) != (args.bvec is None):
        p.error("give both --bval and --bvec, or neither")
    if args.bval is not None:
        from fingerprint.io.gradients import read_bvals_bvecs

        scheme = read_bvals_bvecs(args.bval, args.bvec)
    phantom = noddi_phantom(shape=tuple(args.shape), seed=args.seed, snr=args.snr or None,
                            scheme=scheme, background=args.background)
    for key, path in write_phantom(phantom, args.out, prefix=args.prefix).items():
        print(f"{key:16s} {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
