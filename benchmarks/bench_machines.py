"""Machine benchmark: committed step transitions per second (mainspring.bench.machines).

Examples::

python benchmarks/bench_machines.py --backend postgres --machines 5000
python benchmarks/bench_machines.py --backend sqlite --machines 5000 --json
"""

from __future__ import annotations

import argparse
import sys

from mainspring.bench.machines import render, run_machines_bench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("postgres", "sqlite"), default="postgres")
    parser.add_argument("--url", default=None, help="PostgreSQL server URL (default: local)")
    parser.add_argument("--machines", type=int, default=5_000)
    parser.add_argument("--concurrency", type=int, default=500)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ns = parser.parse_args(argv)
    result = run_machines_bench(ns.backend, ns.url, ns.machines, concurrency=ns.concurrency)
    print(render(result, "json" if ns.json else "table"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
