"""What pruning buys: the same sweep with pruner none, median and hyperband.

    python benchmarks/sweep_pruning.py [SWEEP_FILE] [--trials N] [--workers W] [--out DIR]

Same sampler and seed for each; reports the best objective, the training tokens spent (the
compute) and the wall time. Pruning should reach a similar best for a fraction of the tokens.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import tomllib
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def dump_toml(data: dict) -> str:
    """Enough TOML for a sweep file: tables of scalars, and [search.X] sub-tables."""
    lines = []
    for table, body in data.items():
        if table == "search":
            for name, spec in body.items():
                lines.append(f"[search.{name}]")
                lines += [f"{k} = {_toml_value(v)}" for k, v in spec.items()]
        else:
            lines.append(f"[{table}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in body.items()]
    return "\n".join(lines) + "\n"


def main() -> int:
    from proxy_sweeps.sweep import run_sweep

    ap = argparse.ArgumentParser()
    ap.add_argument("file", nargs="?", default=str(ROOT / "proxy_sweeps" / "quickstart.toml"))
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    base = tomllib.loads(Path(args.file).read_text())
    out = Path(args.out or tempfile.mkdtemp(prefix="sweep-pruning-"))
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for pruner in ("none", "median", "hyperband"):
        data = {**base, "pruner": {"kind": pruner}, "sweep": {**base.get("sweep", {}), "name": f"pruning-{pruner}"}}
        path = out / f"{pruner}.toml"
        path.write_text(dump_toml(data))
        start = time.perf_counter()
        run_sweep(path, out / pruner, workers=args.workers, trials=args.trials, quiet=True)
        df = pd.read_parquet(out / pruner / "trials.parquet")
        rows.append({"pruner": pruner, "best": df["value"].min(), "tokens": int(df["tokens"].sum()),
                     "pruned": int((df["state"] == "PRUNED").sum()), "wall_s": round(time.perf_counter() - start, 1)})
    table = pd.DataFrame(rows)
    table["tokens_vs_none"] = (table["tokens"] / table.loc[0, "tokens"]).round(2)
    print(table.to_string(index=False))
    print(f"(sweep directories under {out})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
