"""What a deploy needs to know about running workflows: versions, removable patches, stuck runs."""

from __future__ import annotations

import ast
import inspect
import textwrap
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mainspring.run import TERMINAL
from mainspring.workflows import history as h

if TYPE_CHECKING:
    from mainspring.app import App
    from mainspring.run import Run
    from mainspring.workflows.workflow import WorkflowDef

_ACTIVE = sorted({"scheduled", "available", "running", "waiting"})


@dataclass(frozen=True, slots=True)
class PatchSite:
    """A `wf.patched("id")` call in loaded code, and whether its guard can go."""

    workflow: str
    version: str
    patch: str
    file: str
    line: int
    runs_before: int  # active runs whose journal has no marker for it (they take the old path)

    @property
    def safe_to_remove(self) -> bool:
        return self.runs_before == 0


@dataclass
class AuditReport:
    loaded: dict[str, list[str]] = field(default_factory=dict)  # workflow -> versions loaded
    active: dict[str, int] = field(default_factory=dict)  # "name@version" -> active runs
    patches: list[PatchSite] = field(default_factory=list)
    stuck: list[dict[str, str]] = field(default_factory=list)  # runs on versions not loaded

    def problems(self) -> list[str]:
        """What --strict fails on: patch guards that can go, and runs no loaded code can run."""
        found = [f"patch {p.patch!r} of {p.workflow} ({p.file}:{p.line}) is safe to remove"
                 for p in self.patches if p.safe_to_remove]  # fmt: skip
        found += [f"run {s['id']} of {s['workflow']} is on version {s['version']}, which is "
                  "not loaded" for s in self.stuck]  # fmt: skip
        return found

    def to_dict(self) -> dict[str, Any]:
        patches = [
            {"workflow": p.workflow, "version": p.version, "patch": p.patch, "file": p.file,
             "line": p.line, "runs_before": p.runs_before, "safe_to_remove": p.safe_to_remove}
            for p in self.patches
        ]  # fmt: skip
        return {"loaded": self.loaded, "active": self.active, "patches": patches,
                "stuck": self.stuck, "problems": self.problems()}  # fmt: skip


async def audit(app: App) -> AuditReport:
    """Read every active workflow run and compare it with the code this app has loaded."""
    from mainspring.search import query_runs

    report = AuditReport()
    for name, version in sorted(app.workflow_versions):
        report.loaded.setdefault(name, []).append(version)
    store = await app.store()
    runs: list[Run] = []
    cursor = None
    while True:
        page = await query_runs(store, where=[("in", ["state"], _ACTIVE)], limit=1000,
                                order_by=("asc", "id"), cursor=cursor)  # fmt: skip
        runs += [r for r in page.items if r.state not in TERMINAL]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    for run in runs:
        version = str((run.input or {}).get("version", "1"))
        key = f"{run.name}@{version}"
        report.active[key] = report.active.get(key, 0) + 1
        if (run.name, version) not in app.workflow_versions:
            report.stuck.append({"id": run.id, "workflow": run.name, "version": version})
    markers = await _patch_markers(app, [r.id for r in runs])
    for (name, version), definition in sorted(app.workflow_versions.items()):
        mine = [r for r in runs if r.name == name]
        for patch, file, line in patch_sites(definition):
            before = sum(1 for r in mine if patch not in markers.get(r.id, set()))
            report.patches.append(PatchSite(name, version, patch, file, line, before))
    return report


async def _patch_markers(app: App, run_ids: list[str]) -> dict[str, set[str]]:
    """The patches each run's journal has recorded."""
    store = await app.store()
    found: dict[str, set[str]] = {}
    for start in range(0, len(run_ids), 500):
        data = await store.load_step_data(run_ids[start : start + 500], events=True)
        for run_id, step in data.items():
            found[run_id] = {e.data.get("key") for e in step.events if e.kind == h.PATCH}
    return found


def patch_sites(definition: WorkflowDef) -> list[tuple[str, str, int]]:
    """The `.patched("literal")` calls in a workflow's source: (patch, file, line)."""
    try:
        lines, first = inspect.getsourcelines(definition.fn)
        file = inspect.getsourcefile(definition.fn) or "?"
    except (OSError, TypeError):
        return []
    tree = ast.parse(textwrap.dedent("".join(lines)))
    sites = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "patched"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            sites.append((node.args[0].value, file, first + node.lineno - 1))
    return sites
