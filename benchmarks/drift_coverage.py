"""Coverage of the transfer check's drift interval on synthetic crossed runs (a benchmark, not a test).

The transfer check's seeds are crossed with its axis: seed s is the same initialisation seed and
data order at every width (depth, horizon, batch). So a seed's optimum has a part common to every
value and a part of its own. This script draws such runs -- parabolic loss curves in log2 LR whose
optimum is -6 at every value (true drift 0), moved per seed by a common offset (``--shared`` sd,
octaves) plus one per (value, seed) (``--own`` sd), with per-run and per-evaluation-batch noise --
and reports how often the 90 % interval of the drift (largest value's optimum minus smallest's)
contains 0, and its mean width, two ways:

- ``paired``: every value resampled with the same seed and batch draws (what the check does);
- ``per-value``: each value resampled on its own draws (what it did before).

    python benchmarks/drift_coverage.py                          # shared 0.4, own 0.2, 3 seeds, 200 draws
    python benchmarks/drift_coverage.py --shared 0 --own 0.3     # nothing shared: both should cover
    python benchmarks/drift_coverage.py --seeds 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from mutransfer import optimum_stats as stats

GRID = np.arange(-10.0, -1.0, 1.0)  # log2 LR, as the shipped grids
VALUES = (32, 64, 128, 256)
CURVATURE = 0.03  # nats per octave^2 around the optimum, about the shipped grids'
TRUE_OPTIMUM = -6.0


def draw_tables(rng: np.random.Generator, seeds: int, batches: int, shared: float, own: float,
                noise: float) -> list[np.ndarray]:
    """One [seed, batch, LR] loss table per axis value, seeds crossed with the values."""
    common = rng.normal(0, shared, size=seeds)
    tables = []
    for _ in VALUES:
        optimum = TRUE_OPTIMUM + common + rng.normal(0, own, size=seeds)  # (seeds,)
        clean = 2.0 + CURVATURE * (GRID[None, :] - optimum[:, None]) ** 2 + rng.normal(0, noise, size=(seeds, 1))
        tables.append(clean[:, None, :] + rng.normal(0, noise, size=(seeds, batches, len(GRID))))
    return tables


def drift_interval(tables: list[np.ndarray], paired: bool, n_boot: int, seed: int) -> list[float] | None:
    boots = [stats.bootstrap_optimum(GRID, t, n_boot=n_boot, rng=seed if paired else seed * 100 + i)
             for i, t in enumerate(tables)]
    drift = stats.bootstrap_shift(boots, VALUES)["drift"]
    return None if drift is None else drift["ci"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=200, help="synthetic checks per way")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=4, help="held-out evaluation batches per run")
    parser.add_argument("--shared", type=float, default=0.4, help="sd of a seed's optimum offset common to every value")
    parser.add_argument("--own", type=float, default=0.2, help="sd of a (value, seed) optimum offset of its own")
    parser.add_argument("--noise", type=float, default=0.01, help="sd of per-run and per-batch loss noise (nats)")
    parser.add_argument("--bootstrap", type=int, default=stats.DEFAULT_BOOT)
    parser.add_argument("--json", dest="out", help="write the figures here")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    result = {way: {"covered": 0, "width_sum": 0.0, "no_interval": 0} for way in ("paired", "per-value")}
    for i in range(args.draws):
        tables = draw_tables(rng, args.seeds, args.batches, args.shared, args.own, args.noise)
        for way, r in result.items():
            ci = drift_interval(tables, way == "paired", args.bootstrap, i)
            if ci is None:
                r["no_interval"] += 1
                continue
            r["covered"] += ci[0] <= 0 <= ci[1]
            r["width_sum"] += ci[1] - ci[0]
        if (i + 1) % 50 == 0:
            print(f"  {i + 1}/{args.draws} draws", file=sys.stderr, flush=True)
    print(f"seeds {args.seeds}, batches {args.batches}, shared sd {args.shared}, own sd {args.own}, "
          f"noise {args.noise}, {args.draws} draws; nominal coverage 0.90")
    rows = {}
    for way, r in result.items():
        n = args.draws - r["no_interval"]
        rows[way] = {"coverage": round(r["covered"] / n, 3) if n else None,
                     "mean_width": round(r["width_sum"] / n, 3) if n else None, "draws_with_interval": n}
        print(f"{way:<10} coverage {rows[way]['coverage']}, mean drift-interval width {rows[way]['mean_width']} octave")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"settings": vars(args), "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
