"""A sweep worker process: ``python -m proxy_sweeps.worker DIR --index I``.

Started by ``mutransfer sweep`` (one per --workers), or by hand on another machine sharing the
storage. It reads DIR/config.json and pulls trials until the study's budget is spent.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy_sweeps.worker")
    parser.add_argument("out", help="the sweep directory (holds config.json)")
    parser.add_argument("--index", type=int, default=0, help="worker number on this machine (seeds the sampler)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--storage", help="storage URL (default: $MUTRANSFER_SWEEP_STORAGE, then config.json)")
    args = parser.parse_args(argv)
    from proxy_sweeps.engine import work

    return work(args.out, args.index, args.threads, args.storage)


if __name__ == "__main__":
    sys.exit(main())
