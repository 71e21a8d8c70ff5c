"""The static determinism check run on a workflow function when it is decorated.

A workflow is replayed against its journal after a crash or a move to another
node, so its own code must make the same decisions every time it runs. Reading
the clock, drawing randomness, doing I/O, starting threads or touching the
cluster's shared state (KV, registry, process groups, messaging) gives a
different answer on replay; those calls belong in an activity, or behind the
recorded `wf.*` equivalent (`wf.now()`, `wf.random()`, `wf.uuid4()`,
`wf.sleep()`, `wf.side_effect(...)`).

What the check sees, and what it does not:

- Only the workflow function's own body is read, including the lambdas,
  nested functions and comprehensions in it. Functions it calls are not
  followed: activities are where I/O belongs, and helpers are the user's
  responsibility.
- A name is resolved the way Python would: the function's own imports, its
  local variables (which hide everything else: `wf.now()` is never flagged),
  its closure, its module's globals and import statements, then builtins.
  So `import time as t; t.time()`, `from random import randint; randint()`
  and `import datetime; datetime.datetime.now()` are all recognised.
  Aliases made by assignment inside the workflow are not followed.
- Calls are checked; a bare reference is not, so `wf.side_effect(time.time)`
  is fine. The one exception is the process environment: reading
  `os.environ[...]` is flagged like a call.
- Everything passed to `wf.side_effect(...)` (and nested functions passed to
  it by name) is exempt: that is where a non-deterministic value is recorded.
- The cluster APIs live on the `App` (`app.kv`, `app.registry`,
  `app.groups`, `app.hub`, `app.processes`) and in `mainspring.cluster`.
  An attribute chain is recognised when its root is an `App` instance in the
  closure or module globals, or a name `app` that resolves to nothing else.
- A line carrying `# mainspring: allow` is trusted: use it for a call the
  check cannot know is safe, such as `random.Random(seed)`.
- When the source cannot be read (a function made in a REPL or with `exec`),
  there is nothing to check and no finding is reported.
"""

from __future__ import annotations

import ast
import builtins
import importlib.util
import inspect
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from mainspring.errors import ConfigError, MainspringError

ALLOW_COMMENT = "# mainspring: allow"

# The resolved name of an `App` instance, the root of the cluster APIs.
_APP = "mainspring.App"


@dataclass(frozen=True)
class Finding:
    """One call in a workflow's source that would not replay deterministically."""

    file: str
    line: int
    call: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.call} {self.reason}"


class DeterminismError(MainspringError):
    """A workflow's source calls something that would give a different result on replay."""

    def __init__(self, workflow: str, findings: Sequence[Finding]) -> None:
        self.workflow = workflow
        self.findings = list(findings)
        lines = "\n".join(f"  {finding}" for finding in self.findings)
        super().__init__(
            f"workflow {workflow} would not replay deterministically:\n{lines}\n"
            "Move each call into an activity or use the wf.* replacement named; "
            f"mark a line you have checked is safe with '{ALLOW_COMMENT}'."
        )


@dataclass(frozen=True)
class _Rule:
    patterns: tuple[str, ...]  # resolved dotted names; "x.*" is x and everything under it
    reason: str
    hint: str
    references: bool = False  # also flag a bare reference, not only a call

    def matches(self, name: str) -> bool:
        return any(_matches(pattern, name) for pattern in self.patterns)


def _matches(pattern: str, name: str) -> bool:
    if pattern.endswith(".*"):
        return name == pattern[:-2] or name.startswith(pattern[:-1])
    return name == pattern


_ACTIVITY = "move it into an activity: await wf.activity(task, ...)"

# Pure helpers under otherwise-rejected modules.
_ALLOWED = (
    "os.path.join",
    "os.path.basename",
    "os.path.dirname",
    "os.path.split",
    "os.path.splitext",
    "os.path.splitdrive",
    "os.path.normpath",
    "os.path.normcase",
    "os.path.isabs",
    "os.path.commonpath",
    "os.path.commonprefix",
    "os.fspath",
    "os.fsencode",
    "os.fsdecode",
    "urllib.parse.*",
)

# First match wins, so specific names come before the module-wide patterns.
_RULES = (
    _Rule(
        ("time.sleep", "asyncio.sleep"),
        "waits on a timer that is not in the journal",
        "use await wf.sleep(seconds), a durable timer",
    ),
    _Rule(
        ("asyncio.wait_for", "asyncio.timeout", "asyncio.timeout_at"),
        "measures time on the event loop's clock",
        "pass timeout= to the wf call instead, e.g. wf.activity(..., timeout=30)",
    ),
    _Rule(
        ("asyncio.wait", "asyncio.as_completed"),
        "depends on the order in which live tasks finish",
        "use asyncio.gather(...)",
    ),
    _Rule(
        ("asyncio.get_event_loop", "asyncio.get_running_loop"),
        "hands out the event loop's clock, timers and executors",
        "use wf.now() and wf.sleep(), and move blocking work into wf.activity(...)",
    ),
    _Rule(
        (
            "time.*",
            "datetime.datetime.now",
            "datetime.datetime.utcnow",
            "datetime.datetime.today",
            "datetime.date.today",
        ),
        "reads the wall clock",
        "use wf.now() (or move it into an activity)",
    ),
    _Rule(
        ("uuid.uuid1", "uuid.uuid4"),
        "makes a different id every time it runs",
        "use wf.uuid4() (or move it into an activity)",
    ),
    _Rule(
        ("random.*", "secrets.*", "os.urandom", "os.getrandom"),
        "draws randomness that differs on replay",
        "use wf.random() or wf.uuid4() (or wf.side_effect(...))",
    ),
    _Rule(
        ("os.environ.*", "os.environb.*", "os.getenv", "os.getenvb"),
        "reads the process environment, which may differ on the node that replays",
        "pass the value in the workflow input, or read it with wf.side_effect(...)",
        references=True,
    ),
    _Rule(
        (
            "threading.*",
            "_thread.*",
            "concurrent.futures.*",
            "multiprocessing.*",
            "asyncio.to_thread",
        ),
        "runs code on another thread or process, outside the journal",
        "run the work as activities and await them with asyncio.gather(wf.activity(...), ...)",
    ),
    _Rule(
        (
            "builtins.open",
            "builtins.input",
            "io.open",
            "os.*",
            "shutil.*",
            "tempfile.*",
            "glob.*",
            "socket.*",
            "subprocess.*",
            "requests.*",
            "httpx.*",
            "aiohttp.*",
            "urllib.*",
            "urllib3.*",
            "http.client.*",
            "asyncio.open_connection",
            "asyncio.open_unix_connection",
            "asyncio.start_server",
            "asyncio.start_unix_server",
            "asyncio.create_subprocess_exec",
            "asyncio.create_subprocess_shell",
        ),
        "does I/O that is not recorded in the journal",
        _ACTIVITY,
    ),
    _Rule(
        (
            f"{_APP}.kv.*",
            f"{_APP}.registry.*",
            f"{_APP}.groups.*",
            f"{_APP}.hub.*",
            f"{_APP}.processes.*",
            "mainspring.cluster.*",
        ),
        "uses the cluster (KV, registry, process groups, messaging), "
        "whose state is not in the run's journal",
        _ACTIVITY,
    ),
)


def _rule_for(name: str) -> _Rule | None:
    if any(_matches(pattern, name) for pattern in _ALLOWED):
        return None
    return next((rule for rule in _RULES if rule.matches(name)), None)


def check_workflow(fn: Callable[..., Any]) -> list[Finding]:
    """Every call in `fn`'s own body that would break replay, in source order.

    Functions `fn` calls are not followed. A function whose source cannot be
    read (defined in a REPL or with `exec`) yields no findings.
    """
    fn = inspect.unwrap(fn)
    if not inspect.isfunction(fn):
        raise ConfigError(f"{fn!r} is not a function; a workflow is an async def function")
    try:
        lines, _ = inspect.findsource(fn)
        module = ast.parse("".join(lines))
    except (OSError, TypeError, SyntaxError):
        return []
    definition = _definition_of(fn, module)
    if definition is None:
        return []
    file = inspect.getsourcefile(fn) or fn.__code__.co_filename
    checker = _Checker(_Names(fn, module, definition), file, lines, definition)
    for statement in definition.body:
        checker.visit(statement)
    return sorted(checker.findings, key=lambda finding: finding.line)


def assert_deterministic(fn: Callable[..., Any]) -> None:
    """Raise `DeterminismError` listing every finding of `check_workflow(fn)`, if any."""
    findings = check_workflow(fn)
    if findings:
        name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)!s}"
        raise DeterminismError(name, findings)


_Function = ast.FunctionDef | ast.AsyncFunctionDef


def _definition_of(fn: Callable[..., Any], module: ast.Module) -> _Function | None:
    """The `def` of `fn` in its module's syntax tree, found by name and first line."""
    first_line = fn.__code__.co_firstlineno
    for node in ast.walk(module):
        if isinstance(node, _Function) and node.name == fn.__name__:
            starts = [node.lineno, *(decorator.lineno for decorator in node.decorator_list)]
            if min(starts) == first_line:
                return node
    return None


class _Names:
    """Resolves a name used in the workflow to the dotted name of what it refers to."""

    def __init__(self, fn: Callable[..., Any], module: ast.Module, definition: _Function) -> None:
        package = fn.__globals__.get("__package__")
        self.local_imports, _ = _imports(ast.walk(definition), package)
        self.module_imports, self.star_imports = _imports(_module_level(module.body), package)
        self.locals = _bound_names(definition)
        self.closure = _closure(fn)
        self.globals = fn.__globals__

    def resolve(self, name: str) -> str | None:
        """None for a local variable or a name that resolves to nothing known."""
        if name in self.local_imports:
            return self.local_imports[name]
        if name in self.locals:
            return None
        if name in self.closure:
            return self._path_of(name, self.closure[name])
        if name in self.globals:
            value = self.globals[name]
            if not _is_app(value) and name in self.module_imports:
                return self.module_imports[name]
            return self._path_of(name, value)
        if name in self.module_imports:  # imported further down the module than the workflow
            return self.module_imports[name]
        if hasattr(builtins, name):
            return f"builtins.{name}"
        return _APP if name == "app" else None

    def _path_of(self, name: str, value: object) -> str:
        if _is_app(value):
            return _APP
        if isinstance(value, ModuleType):
            return _public_module(value.__name__)
        for module_name in self.star_imports:
            if getattr(sys.modules.get(module_name), name, None) is value:
                return f"{module_name}.{name}"
        module = getattr(value, "__module__", None)
        qualname = getattr(value, "__qualname__", None)
        if isinstance(qualname, str):
            if isinstance(module, str):
                return f"{_public_module(module)}.{qualname}"
            owner = getattr(value, "__self__", None)  # a builtin classmethod: datetime.now
            if isinstance(owner, type):
                return f"{_public_module(owner.__module__)}.{qualname}"
        kind = type(value)  # an instance: its methods are the class's
        return f"{_public_module(kind.__module__)}.{kind.__qualname__}"


def _is_app(value: object) -> bool:
    from mainspring.app import App  # here, not at the top: the app registers workflows

    return isinstance(value, App)


def _public_module(name: str) -> str:
    """The name users import a module by: os.path for posixpath, asyncio for asyncio.tasks."""
    if name in ("posixpath", "ntpath"):
        return "os.path"
    if name in ("posix", "nt"):
        return "os"
    if name.startswith("asyncio."):
        return "asyncio"
    return name


def _imports(nodes: Iterable[ast.AST], package: object) -> tuple[dict[str, str], list[str]]:
    """Names bound by the import statements among `nodes`, and the modules star-imported."""
    names: dict[str, str] = {}
    stars: list[str] = []
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    names[alias.asname] = alias.name
                else:
                    root = alias.name.partition(".")[0]
                    names[root] = root
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(node, package)
            if source is None:
                continue
            for alias in node.names:
                if alias.name == "*":
                    stars.append(source)
                else:
                    names[alias.asname or alias.name] = f"{source}.{alias.name}"
    return names, stars


def _absolute(node: ast.ImportFrom, package: object) -> str | None:
    if not node.level:
        return node.module
    if not isinstance(package, str) or not package:
        return None
    try:
        return importlib.util.resolve_name("." * node.level + (node.module or ""), package)
    except (ImportError, ValueError):
        return None


def _module_level(statements: Iterable[ast.stmt]) -> Iterator[ast.stmt]:
    """Statements that run at import time, including inside `if`, `try` and `with` blocks."""
    for statement in statements:
        yield statement
        if isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            continue
        for child in ast.iter_child_nodes(statement):
            if isinstance(child, ast.ExceptHandler):
                yield from _module_level(child.body)
            elif isinstance(child, ast.stmt):
                yield from _module_level([child])


def _bound_names(definition: _Function) -> set[str]:
    """Every name assigned anywhere in the function, which hides a global of that name."""
    bound: set[str] = set()
    declared: set[str] = set()
    for node in ast.walk(definition):
        if isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            bound.add(node.id)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            if node is not definition:
                bound.add(node.name)
        elif isinstance(node, ast.ExceptHandler | ast.MatchAs | ast.MatchStar):
            if node.name:
                bound.add(node.name)
        elif isinstance(node, ast.MatchMapping) and node.rest:
            bound.add(node.rest)
        elif isinstance(node, ast.Global | ast.Nonlocal):
            declared.update(node.names)
    return bound - declared


def _closure(fn: Callable[..., Any]) -> dict[str, object]:
    values: dict[str, object] = {}
    for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or (), strict=True):
        try:
            values[name] = cell.cell_contents
        except ValueError:  # not assigned yet when the workflow is decorated
            continue
    return values


class _Checker(ast.NodeVisitor):
    """Collects the findings in a workflow's body; `visit` each statement of it."""

    def __init__(self, names: _Names, file: str, lines: list[str], definition: _Function) -> None:
        self.names = names
        self.file = file
        self.lines = lines
        self.findings: list[Finding] = []
        # Nested functions handed to wf.side_effect by name run once and are recorded.
        self.recorded = {
            argument.id
            for call in ast.walk(definition)
            if isinstance(call, ast.Call) and _records(call)
            for argument in _arguments(call)
            if isinstance(argument, ast.Name)
        }

    def visit_Call(self, node: ast.Call) -> None:
        parts = _dotted(node.func)
        if parts is None:
            self.visit(node.func)
        else:
            self._check(node, parts, call=True)
        if not _records(node):
            for argument in _arguments(node):
                self.visit(argument)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        parts = _dotted(node)
        if parts is None:
            self.generic_visit(node)
        else:
            self._check(node, parts, call=False)

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load):
            self._check(node, [node.id], call=False)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        if node.name not in self.recorded:
            self.generic_visit(node)

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        if node.name not in self.recorded:
            self.generic_visit(node)

    def _check(self, node: ast.expr, parts: list[str], *, call: bool) -> None:
        root = self.names.resolve(parts[0])
        if root is None:
            return
        resolved = ".".join([root, *parts[1:]])
        rule = _rule_for(resolved)
        if rule is None or not (call or rule.references):
            return
        if ALLOW_COMMENT in self.lines[node.lineno - 1]:
            return
        written = ".".join(parts)
        shown = f"{written}()" if call else written
        if root != _APP and resolved.split(".")[-len(parts) :] != parts:
            shown += f" ({resolved})"
        reason = f"{rule.reason}; {rule.hint}"
        self.findings.append(Finding(self.file, node.lineno, shown, reason))


def _records(call: ast.Call) -> bool:
    """Whether the call is `<something>.side_effect(...)`, whose arguments run once, recorded."""
    return isinstance(call.func, ast.Attribute) and call.func.attr == "side_effect"


def _arguments(call: ast.Call) -> list[ast.expr]:
    return [*call.args, *(keyword.value for keyword in call.keywords)]


def _dotted(node: ast.expr) -> list[str] | None:
    """`a.b.c` as ["a", "b", "c"]; None when the chain does not start at a plain name."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return parts[::-1]
