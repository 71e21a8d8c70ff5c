"""Job benchmark: enqueue, processing, latency, backlog and memory (mainspring.bench.jobs).

Examples::

python benchmarks/bench_jobs.py --backend postgres --jobs 20000
python benchmarks/bench_jobs.py --backend sqlite --jobs 20000 --json
python benchmarks/bench_jobs.py --backend postgres --pending 1000000 --no-peers
"""

from __future__ import annotations

import argparse
import sys

from mainspring.bench.jobs import render, run_jobs_bench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("postgres", "sqlite"), default="postgres")
    parser.add_argument("--url", default=None, help="PostgreSQL server URL (default: local)")
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--pending", type=int, default=0, help="backlog for the flat-claim test")
    parser.add_argument("--no-peers", dest="peers", action="store_false")
    parser.add_argument("--no-rss", dest="rss", action="store_false")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ns = parser.parse_args(argv)
    result = run_jobs_bench(
        ns.backend,
        ns.url,
        ns.jobs,
        concurrency=ns.concurrency,
        peers=ns.peers,
        pending=ns.pending,
        include_rss=ns.rss,
        loop=ns.loop,
    )
    print(render(result, "json" if ns.json else "table"))
    return 1 if result.errors else 0


if __name__ == "__main__":
    sys.exit(main())
