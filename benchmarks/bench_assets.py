"""Asset benchmark: scatter instances per second and materialization recording cost.

Examples::

python benchmarks/bench_assets.py --backend postgres --instances 10000
python benchmarks/bench_assets.py --backend sqlite --instances 10000 --json
"""

from __future__ import annotations

import argparse
import sys

from mainspring.bench.assets import render, run_assets_bench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("postgres", "sqlite"), default="postgres")
    parser.add_argument("--url", default=None, help="PostgreSQL server URL (default: local)")
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=1000)
    parser.add_argument("--materializations", type=int, default=500)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ns = parser.parse_args(argv)
    result = run_assets_bench(ns.backend, ns.url, ns.instances, concurrency=ns.concurrency,
                              materializations=ns.materializations)  # fmt: skip
    print(render(result, "json" if ns.json else "table"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
