"""Process benchmark: messages to remote and local processes, redistribution, pg latency
(mainspring.bench.processes).

Examples::

python benchmarks/bench_processes.py --backend postgres
python benchmarks/bench_processes.py --backend sqlite --messages 5000 --json
"""

from __future__ import annotations

import argparse
import sys

from mainspring.bench.processes import render, run_processes_bench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("postgres", "sqlite"), default="postgres")
    parser.add_argument("--url", default=None, help="PostgreSQL server URL (default: local)")
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--children", type=int, default=100)
    parser.add_argument("--local-messages", type=int, default=200_000)
    parser.add_argument("--redistribute", type=int, default=10_000)
    parser.add_argument("--pg-ops", type=int, default=10_000)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ns = parser.parse_args(argv)
    result = run_processes_bench(
        ns.backend, ns.url, ns.messages, children=ns.children, local_messages=ns.local_messages,
        redistribute=ns.redistribute, pg_ops=ns.pg_ops,
    )  # fmt: skip
    print(render(result, "json" if ns.json else "table"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
