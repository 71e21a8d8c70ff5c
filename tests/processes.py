"""Real worker processes for tests: start them, read what they record, clean them up.

Each test's processes share one record file of JSON lines (written with one
O_APPEND write each, so processes never interleave lines) and keep a log each.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Self


class WorkerProcesses:
    """Worker processes of one test running `script`, their shared record file and their logs.

    As a context manager it kills whatever still runs on exit (a fixture's teardown).
    """

    def __init__(self, directory: Path, script: Path) -> None:
        self.dir = directory
        self.script = script
        self.record_file = directory / "records.jsonl"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.cleanup()

    def spawn(self, node: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        """Start `python script` as `node` with this environment; its output goes to its log."""
        with open(self.dir / f"{node}.log", "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, str(self.script)],
                env={**env, "PYTHONUNBUFFERED": "1"},
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.procs[node] = proc
        return proc

    def records(self, event: str | None = None, **match: Any) -> list[dict[str, Any]]:
        """The recorded lines (complete ones only), optionally filtered."""
        try:
            text = self.record_file.read_text()
        except FileNotFoundError:
            return []
        lines = [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]
        return [
            r
            for r in lines
            if (event is None or r["event"] == event)
            and all(r.get(k) == v for k, v in match.items())
        ]

    def log(self, node: str) -> str:
        path = self.dir / f"{node}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self, tail: int = 40) -> str:
        parts = []
        for node in self.procs:
            lines = self.log(node).splitlines()[-tail:]
            parts.append(f"--- {node} (last {len(lines)} lines) ---\n" + "\n".join(lines))
        return "\n".join(parts)

    def cleanup(self) -> None:
        """Kill what still runs (a stopped process is continued first, so it can die)."""
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.kill(proc.pid, signal.SIGCONT)
                    proc.kill()
                except ProcessLookupError:
                    pass
            proc.wait(timeout=10)
