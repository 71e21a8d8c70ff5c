"""The static determinism check: what it rejects, what it allows, how it reports."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest

import mainspring as ms
import workflow_check_samples as samples
from mainspring.workflows.check import (
    DeterminismError,
    Finding,
    assert_deterministic,
    check_workflow,
)


def calls(fn: Callable[..., Any]) -> list[str]:
    return [finding.call for finding in check_workflow(fn)]


def line_of(fn: Callable[..., Any], text: str) -> int:
    lines, start = inspect.getsourcelines(fn)
    return start + next(i for i, line in enumerate(lines) if text in line)


def test_wall_clock_and_timers_are_rejected() -> None:
    assert calls(samples.wall_clock) == [
        "time.time()",
        "datetime.datetime.now()",
        "date.today()",
        "asyncio.sleep()",
        "time.sleep()",
    ]


def test_names_are_resolved_through_aliases_and_from_imports() -> None:
    assert calls(samples.aliased_imports) == ["t.time() (time.time)", "monotonic()", "randint()"]


def test_randomness_is_rejected() -> None:
    assert calls(samples.randomness) == [
        "random.random()",
        "secrets.token_hex()",
        "uuid.uuid4()",
        "uuid.uuid1()",
        "os.urandom()",
    ]


def test_io_and_the_environment_are_rejected_including_imports_inside_the_workflow() -> None:
    assert calls(samples.io_and_environment) == [
        "open()",
        "os.environ",
        "subprocess.run()",
        "socket.socket()",
        "requests.get()",
        "httpx.get()",
        "urllib.request.urlopen()",
        "os.listdir()",
        "input()",
    ]


def test_threads_are_rejected() -> None:
    assert calls(samples.threads) == [
        "threading.Thread()",
        "ThreadPoolExecutor()",
        "asyncio.to_thread()",
    ]


def test_waits_on_the_event_loop_clock_are_rejected() -> None:
    findings = check_workflow(samples.loop_clock)
    assert [finding.call for finding in findings] == ["asyncio.wait_for()", "asyncio.wait()"]
    assert "timeout=" in findings[0].reason
    assert "asyncio.gather" in findings[1].reason


def test_cluster_apis_are_rejected() -> None:
    assert calls(samples.cluster) == [
        "app.kv.put()",
        "cluster_app.registry.lookup()",
        "cluster_app.hub.send()",
        "cluster_app.groups.members()",
        "mc.lookup() (mainspring.cluster.lookup)",
    ]


def test_lambdas_nested_functions_and_comprehensions_are_checked() -> None:
    assert calls(samples.nested) == ["time.time()", "random.random()", "uuid.uuid4()"]


def test_gather_pure_helpers_wf_calls_and_side_effects_are_allowed() -> None:
    assert check_workflow(samples.allowed) == []


def test_local_names_hide_the_modules_they_shadow() -> None:
    assert check_workflow(samples.shadowed) == []


def test_a_line_marked_allow_is_trusted() -> None:
    assert check_workflow(samples.trusted) == []


def test_closures_and_decorated_functions_are_checked() -> None:
    assert calls(samples.make_closure_workflow()) == ["clock.monotonic() (time.monotonic)"]
    assert calls(samples.decorated) == ["time.time()"]


def test_finding_names_file_line_call_and_replacement() -> None:
    first = check_workflow(samples.wall_clock)[0]
    line = line_of(samples.wall_clock, "started = time.time()")
    assert first == Finding(
        samples.__file__,
        line,
        "time.time()",
        "reads the wall clock; use wf.now() (or move it into an activity)",
    )
    assert str(first) == (
        f"{samples.__file__}:{line}: time.time() reads the wall clock; "
        "use wf.now() (or move it into an activity)"
    )


def test_every_rule_names_its_replacement() -> None:
    hints = {finding.call: finding.reason for finding in check_workflow(samples.wall_clock)}
    assert "wf.sleep(" in hints["asyncio.sleep()"]
    assert "wf.random()" in check_workflow(samples.randomness)[0].reason
    assert "wf.uuid4()" in check_workflow(samples.randomness)[2].reason
    assert "wf.activity(" in check_workflow(samples.io_and_environment)[0].reason
    assert "wf.side_effect(" in check_workflow(samples.io_and_environment)[1].reason


def test_assert_deterministic_lists_every_finding_one_per_line() -> None:
    with pytest.raises(DeterminismError) as raised:
        assert_deterministic(samples.wall_clock)
    error = raised.value
    assert isinstance(error, ms.MainspringError)
    assert error.findings == check_workflow(samples.wall_clock)
    lines = str(error).splitlines()
    name = "workflow_check_samples.wall_clock"
    assert lines[0] == f"workflow {name} would not replay deterministically:"
    assert lines[1 : 1 + len(error.findings)] == [f"  {finding}" for finding in error.findings]


def test_assert_deterministic_accepts_a_deterministic_workflow() -> None:
    assert_deterministic(samples.allowed)


def test_a_function_without_source_is_not_checked() -> None:
    namespace: dict[str, Any] = {}
    exec("import time\nasync def made(wf, input):\n    return time.time()\n", namespace)
    assert check_workflow(namespace["made"]) == []
    assert_deterministic(namespace["made"])


def test_only_functions_can_be_checked() -> None:
    with pytest.raises(ms.ConfigError, match="not a function"):
        check_workflow(print)
