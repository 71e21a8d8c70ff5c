"""Workflow benchmark: three-activity workflows per second, beside DBOS Transact
(mainspring.bench.workflows).

Examples::

python benchmarks/bench_workflows.py --backend postgres --workflows 2000
python benchmarks/bench_workflows.py --backend sqlite --workflows 2000 --json
"""

from __future__ import annotations

import argparse
import sys

from mainspring.bench.workflows import render, run_workflows_bench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("postgres", "sqlite"), default="postgres")
    parser.add_argument("--url", default=None, help="PostgreSQL server URL (default: local)")
    parser.add_argument("--workflows", type=int, default=2_000)
    parser.add_argument("--concurrency", type=int, default=500)
    parser.add_argument("--no-peers", action="store_true", help="skip DBOS Transact")
    parser.add_argument("--activities", type=int, default=3, help="per workflow (DBOS: 3)")
    parser.add_argument("--workflow-cache", type=int, default=None, help="0: replay every task")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ns = parser.parse_args(argv)
    result = run_workflows_bench(
        ns.backend, ns.url, ns.workflows, concurrency=ns.concurrency, peers=not ns.no_peers,
        workflow_cache=ns.workflow_cache, steps=ns.activities,
    )  # fmt: skip
    print(render(result, "json" if ns.json else "table"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
