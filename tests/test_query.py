"""Search attributes and the run query (mainspring.search), on both backends."""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import mainspring as ms
from helpers import aio
from mainspring.search import QueryError, compile_query, query_runs, set_attributes
from mainspring.store.base import Store

T0 = datetime(2026, 1, 1, tzinfo=UTC)


class Runs:
    """Runs of one task in an app's database: inserted in any namespace, moved to any state."""

    def __init__(self, app: ms.App) -> None:
        self.app = app

        @app.task(name="search.noop")
        def noop() -> None:
            pass

        self.task = noop

    async def store(self) -> Store:
        return await self.app.store()

    async def add(self, namespace: str = "default", priority: int = 0, **attributes: Any) -> str:
        """A new available run with these attributes; returns its id."""
        options = self.task.options(attributes=attributes, priority=priority)
        if namespace == "default":
            return (await options.enqueue_async()).id
        return (await self.add_many(1, namespace, options))[0]

    async def add_many(self, count: int, namespace: str, options: Any = None) -> list[str]:
        """New runs in a namespace, inserted by one statement (so they share created_at)."""
        call = (options or self.task).call()
        now = datetime.now(UTC)
        new = [dataclasses.replace(call.to_new_run(now), namespace=namespace) for _ in range(count)]
        await (await self.store()).insert_runs(new)
        return [run.id for run in new]

    async def mark(
        self,
        run_id: str,
        state: str,
        started_at: datetime | None = None,
        finished_at: datetime | None = None,
    ) -> None:
        """Put a run in a state with these times, as if it had run."""
        store = await self.store()
        sql = "UPDATE ms_runs SET state = $2, started_at = $3, finished_at = $4 WHERE id = $1"
        times: list[Any] = [started_at, finished_at]
        if store.backend == "sqlite":
            sql = sql.replace("$", "?")
            times = [None if t is None else t.timestamp() for t in times]
        await store.fetch_value(sql, run_id, state, *times)

    async def ids(self, *where: Sequence[Any], **query: Any) -> list[str]:
        """The ids of the first page of a query, in its order."""
        query.setdefault("kind", "job")  # these runs are jobs; queries default to workflows
        page = await query_runs(await self.store(), where=where, **query)
        return [run.id for run in page.items]

    async def match(self, *where: Sequence[Any], **query: Any) -> set[str]:
        """The ids a query matches (one page of up to 1000)."""
        return set(await self.ids(*where, limit=1000, **query))

    async def pages(self, **query: Any) -> list[list[str]]:
        """Every page of a query, following next_cursor."""
        store, pages, cursor = await self.store(), [], None
        query.setdefault("kind", "job")
        while True:
            page = await query_runs(store, cursor=cursor, **query)
            pages.append([run.id for run in page.items])
            if page.next_cursor is None:
                return pages
            cursor = page.next_cursor


def attr(key: str) -> list[str]:
    """The path of a top-level attribute."""
    return ["attributes", key]


# -- operators -------------------------------------------------------------------------


@aio
async def test_eq_compares_attribute_values_with_their_json_type(app: ms.App) -> None:
    runs = Runs(app)
    a = await runs.add(plan="pro", n=1, flag=True)
    b = await runs.add(plan="team", n="1", flag=1)
    c = await runs.add(n=1.0)
    d = await runs.add(plan=None)
    await runs.add()
    assert await runs.match(("eq", attr("plan"), "pro")) == {a}
    assert await runs.match(("eq", attr("n"), 1)) == {a, c}
    assert await runs.match(("eq", attr("n"), "1")) == {b}
    assert await runs.match(("eq", attr("flag"), True)) == {a}
    assert await runs.match(("eq", attr("flag"), 1)) == {b}
    assert await runs.match(("eq", attr("plan"), None)) == {d}
    assert await runs.match(("eq", attr("plan"), "enterprise")) == set()


@aio
async def test_ne_matches_present_values_that_differ(app: ms.App) -> None:
    runs = Runs(app)
    pro = await runs.add(plan="pro")
    team = await runs.add(plan="team")
    null = await runs.add(plan=None)
    number = await runs.add(plan=7)
    await runs.add()
    assert await runs.match(("ne", attr("plan"), "pro")) == {team, null, number}
    assert await runs.match(("ne", attr("plan"), None)) == {pro, team, number}


@aio
async def test_range_operators_compare_numbers_with_numbers_and_strings_with_strings(
    app: ms.App,
) -> None:
    runs = Runs(app)
    five = await runs.add(amount=5, code="a")
    ten = await runs.add(amount=10, code="b")
    big = await runs.add(amount=20.5, code="c")
    await runs.add(amount="15", code=3)
    await runs.add()
    assert await runs.match(("gt", attr("amount"), 10)) == {big}
    assert await runs.match(("gte", attr("amount"), 10)) == {ten, big}
    assert await runs.match(("lt", attr("amount"), 10.0)) == {five}
    assert await runs.match(("lte", attr("amount"), 5)) == {five}
    assert await runs.match(("gte", attr("code"), "b")) == {ten, big}
    assert await runs.match(("lt", attr("code"), "b")) == {five}
    assert await runs.match(("gte", attr("amount"), 5), ("lt", attr("amount"), 20)) == {five, ten}


@aio
async def test_in_matches_any_listed_value(app: ms.App) -> None:
    runs = Runs(app)
    pro = await runs.add(plan="pro")
    team = await runs.add(plan="team")
    one = await runs.add(plan=1)
    await runs.add(plan="free")
    await runs.mark(team, "running", started_at=T0)
    assert await runs.match(("in", attr("plan"), ["pro", "team"])) == {pro, team}
    assert await runs.match(("in", attr("plan"), ("pro", 1))) == {pro, one}
    assert await runs.match(("in", attr("plan"), [])) == set()
    assert await runs.match(("in", ["state"], ["running", "waiting"])) == {team}
    assert await runs.match(("in", ["id"], [pro, one])) == {pro, one}
    assert await runs.match(("in", ["started_at"], [T0])) == {team}
    assert await runs.match(("in", ["state"], [])) == set()


@aio
async def test_contains_finds_an_element_of_an_array(app: ms.App) -> None:
    runs = Runs(app)
    vip = await runs.add(tags=["vip", "beta"])
    await runs.add(tags=["beta"])
    await runs.add(tags="vip")
    await runs.add(tags=[["vip"]])
    mixed = await runs.add(tags=[1, True, None])
    nested = await runs.add(meta={"labels": ["vip"]})
    await runs.add()
    assert await runs.match(("contains", attr("tags"), "vip")) == {vip}
    assert await runs.match(("contains", attr("tags"), 1)) == {mixed}
    assert await runs.match(("contains", attr("tags"), True)) == {mixed}
    assert await runs.match(("contains", attr("tags"), None)) == {mixed}
    assert await runs.match(("contains", ["attributes", "meta", "labels"], "vip")) == {nested}
    both = [("contains", attr("tags"), "vip"), ("contains", attr("tags"), "beta")]
    assert await runs.match(*both) == {vip}


@aio
async def test_exists_tells_present_paths_from_missing_ones(app: ms.App) -> None:
    runs = Runs(app)
    present = await runs.add(plan="pro")
    null = await runs.add(plan=None)
    missing = await runs.add(other=1)
    await runs.mark(present, "running", started_at=T0)
    assert await runs.match(("exists", attr("plan"))) == {present, null}
    assert await runs.match(("exists", attr("plan"), True)) == {present, null}
    assert await runs.match(("exists", attr("plan"), False)) == {missing}
    assert await runs.match(("exists", ["started_at"])) == {present}
    assert await runs.match(("exists", ["started_at"], False)) == {null, missing}


@aio
async def test_nested_paths_address_object_keys_only(app: ms.App) -> None:
    runs = Runs(app)
    gold = await runs.add(customer={"tier": "gold", "address": {"country": "FR"}, "seats": 12})
    dotted = await runs.add(**{"customer.tier": "gold"})
    await runs.add(customer="gold")
    listed = await runs.add(tags=["x"], items={"0": "x"})
    tier = ["attributes", "customer", "tier"]
    assert await runs.match(("eq", tier, "gold")) == {gold}
    assert await runs.match(("eq", attr("customer.tier"), "gold")) == {dotted}
    assert await runs.match(("eq", ["attributes", "customer", "address", "country"], "FR")) == {
        gold
    }
    assert await runs.match(("gt", ["attributes", "customer", "seats"], 10)) == {gold}
    assert await runs.match(("exists", tier)) == {gold}
    assert await runs.match(("ne", tier, "silver")) == {gold}
    # a key never indexes an array, on either backend
    assert await runs.match(("eq", ["attributes", "tags", "0"], "x")) == set()
    assert await runs.match(("ne", ["attributes", "tags", "0"], "y")) == set()
    assert await runs.match(("eq", ["attributes", "items", "0"], "x")) == {listed}


@aio
async def test_column_conditions_filter_runs(app: ms.App) -> None:
    runs = Runs(app)
    low = await runs.add(priority=1)
    high = await runs.add(priority=5)
    billing = await runs.add(namespace="billing", priority=5)
    await runs.mark(high, "running", started_at=T0)
    await runs.mark(billing, "completed", started_at=T0 + timedelta(hours=1), finished_at=T0)
    assert await runs.match(("eq", ["state"], "available")) == {low}
    assert await runs.match(("ne", ["state"], "available")) == {high, billing}
    assert await runs.match(("gte", ["priority"], 5)) == {high, billing}
    assert await runs.match(("lt", ["priority"], 5)) == {low}
    assert await runs.match(("gte", ["started_at"], T0 + timedelta(minutes=1))) == {billing}
    assert await runs.match(("lte", ["started_at"], T0)) == {high}
    assert await runs.match(("eq", ["namespace"], "billing")) == {billing}
    assert await runs.match(("eq", ["name"], "search.noop")) == {low, high, billing}
    assert await runs.match(("eq", ["kind"], "job"), ("eq", ["queue"], "default")) == {
        low,
        high,
        billing,
    }
    assert await runs.match(("eq", ["id"], low)) == {low}
    assert await runs.match(("exists", ["parent_id"], False)) == {low, high, billing}
    assert await runs.match(("lt", ["created_at"], datetime.now(UTC) + timedelta(1))) == {
        low,
        high,
        billing,
    }


@aio
async def test_namespace_limits_a_query_to_its_runs(app: ms.App) -> None:
    runs = Runs(app)
    pro = await runs.add(namespace="billing", plan="pro")
    await runs.add(namespace="billing", plan="team")
    await runs.add(namespace="shipping", plan="pro")
    default = await runs.add(plan="pro")
    both = await runs.match(("eq", attr("plan"), "pro"), namespace="billing")
    assert both == {pro}
    assert await runs.match(namespace="default") == {default}
    assert len(await runs.match()) == 4
    assert await runs.match(namespace="nowhere") == set()


# -- order and pages ---------------------------------------------------------------------


@aio
async def test_pages_list_every_run_once_while_runs_are_inserted(app: ms.App) -> None:
    runs = Runs(app)
    store = await runs.store()
    for direction in ("desc", "asc"):
        namespace = f"pages-{direction}"
        for _ in range(7):
            await runs.add(namespace=namespace)
        await runs.add_many(5, namespace)  # same created_at: only id orders them
        await runs.add_many(3, "elsewhere")
        query: dict[str, Any] = {
            "namespace": namespace,
            "order_by": (direction, "created_at"),
            "kind": "job",
        }
        before = await runs.ids(limit=1000, **query)
        assert len(before) == 12
        seen: list[str] = []
        added: list[str] = []
        cursor = None
        while True:
            page = await query_runs(store, limit=5, cursor=cursor, **query)
            seen += [run.id for run in page.items]
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
            added += await runs.add_many(2, namespace)  # newer than every run listed so far
        assert len(seen) == len(set(seen)), "a run was listed twice"
        assert [i for i in seen if i in before] == before, "a run was skipped or moved"
        # newest first, new runs sort before the cursor; oldest first, after it
        assert set(seen) - set(before) == (set() if direction == "desc" else set(added))
        assert len(await runs.ids(limit=1000, **query)) == 12 + len(added)


@aio
async def test_order_by_each_column_breaks_ties_by_id(app: ms.App) -> None:
    runs = Runs(app)
    ids = [await runs.add(priority=p) for p in (3, 1, 3, 2, 3, 1)]
    for n, run_id in enumerate(ids[:4]):
        await runs.mark(
            run_id,
            "completed",
            started_at=T0 + timedelta(seconds=n % 2),
            finished_at=T0 + timedelta(seconds=10 - n),
        )
    store = await runs.store()
    every = {run.id: run for run in await store.get_runs(ids)}
    orders: dict[str, list[str]] = {
        "created_at": ids,
        "started_at": ids[:4],
        "finished_at": ids[:4],
        "updated_at": ids,
        "id": ids,
        "priority": ids,
    }
    for column, listed in orders.items():
        for direction in ("asc", "desc"):
            expected = sorted(
                listed,
                key=lambda i: (getattr(every[i], column), i),
                reverse=direction == "desc",
            )
            order_by = (direction, column)
            assert await runs.ids(limit=1000, order_by=order_by) == expected, order_by
            paged = await runs.pages(limit=2, order_by=order_by)
            assert [i for page in paged for i in page] == expected, order_by
            assert all(paged), "no empty page"


@aio
async def test_the_last_page_has_no_cursor(app: ms.App) -> None:
    runs = Runs(app)
    for _ in range(4):
        await runs.add()
    assert [len(p) for p in await runs.pages(limit=2)] == [2, 2]
    assert [len(p) for p in await runs.pages(limit=4)] == [4]
    assert [len(p) for p in await runs.pages(limit=3)] == [3, 1]
    empty = await query_runs(await runs.store(), namespace="nowhere")
    assert empty.items == [] and empty.next_cursor is None


@aio
async def test_a_cursor_pages_only_the_order_it_came_from(app: ms.App) -> None:
    runs = Runs(app)
    for _ in range(3):
        await runs.add()
    store = await runs.store()
    page = await query_runs(store, limit=1, order_by=("asc", "created_at"), kind=None)
    assert page.next_cursor is not None
    with pytest.raises(QueryError, match="pass the order_by it came from"):
        await query_runs(store, cursor=page.next_cursor, order_by=("desc", "created_at"))
    with pytest.raises(QueryError, match="pass the order_by it came from"):
        await query_runs(store, cursor=page.next_cursor, order_by=("asc", "id"))
    for bad in ("not a cursor!", "", base64.urlsafe_b64encode(b'{"by": 1}').decode(), 42):
        with pytest.raises(QueryError, match="is not a next_cursor of this query"):
            await query_runs(store, cursor=bad, order_by=("asc", "created_at"))  # type: ignore[arg-type]
    forged = base64.urlsafe_b64encode(
        b'{"by": ["asc", "created_at"], "after": ["yesterday", "x"]}'
    ).decode()
    with pytest.raises(QueryError, match="is not a next_cursor of this query"):
        await query_runs(store, cursor=forged, order_by=("asc", "created_at"))


# -- bad queries and injection -----------------------------------------------------------

BAD_QUERIES: list[tuple[dict[str, Any], str]] = [
    ({"where": [("between", ["state"], "x")]}, "unknown operator 'between'"),
    ({"where": [("eq", ["nope"], 1)]}, "unknown column 'nope'"),
    ({"where": [("eq", ["attributes"], 1)]}, "name a key under attributes"),
    ({"where": [("eq", "state", "running")]}, "a path is a list of str"),
    ({"where": [("eq", ["attributes", 1], "x")]}, "a path is a list of str"),
    ({"where": [("eq", [], "x")]}, "a path is a list of str"),
    ({"where": [("eq", ["state", "x"], "running")]}, "holds no keys"),
    ({"where": [("in", ["state"], "running")]}, "'in' needs a list of values"),
    ({"where": [("in", ["state"], ["running"] * 1001)]}, "at most 1000 values"),
    ({"where": [("eq", ["state"], "runing")]}, "unknown state 'runing'"),
    ({"where": [("eq", ["state"], None)]}, "matches \\('exists', \\['state'\\], False\\)"),
    ({"where": [("eq", ["state"])]}, "needs a value"),
    ({"where": [("eq", ["priority"], "1")]}, "holds int"),
    ({"where": [("eq", ["priority"], True)]}, "holds int"),
    ({"where": [("eq", ["priority"], 2**63)]}, "holds int"),
    ({"where": [("eq", ["name"], 5)]}, "holds str"),
    ({"where": [("gte", ["started_at"], datetime(2026, 1, 1))]}, "aware datetime"),
    ({"where": [("gte", ["started_at"], "2026-01-01")]}, "aware datetime"),
    ({"where": [("eq", attr("plan"), {"a": 1})]}, "JSON scalars"),
    ({"where": [("eq", attr("plan"), float("nan"))]}, "JSON scalars"),
    ({"where": [("eq", attr("plan"), 2**64)]}, "JSON scalars"),
    ({"where": [("eq", attr("plan"), T0)]}, "JSON scalars"),
    ({"where": [("in", attr("plan"), [["a"]])]}, "JSON scalars"),
    ({"where": [("gt", attr("n"), True)]}, "compares with a number or a str"),
    ({"where": [("lt", attr("n"), None)]}, "compares with a number or a str"),
    ({"where": [("contains", ["state"], "x")]}, "'contains' tests an array under attributes"),
    ({"where": [("contains", attr("tags"), ["a"])]}, "JSON scalars"),
    ({"where": [("exists", attr("x"), "yes")]}, "True \\(present\\) or False \\(absent\\)"),
    ({"where": [("eq", attr('a"b'), 1)]}, "contains a double quote"),
    ({"where": [("eq", ["state"], "running", "x")]}, "a condition is"),
    ({"where": ["state"]}, "a condition is"),
    ({"where": ("eq", ["state"], "running")}, "a condition is"),
    ({"where": "state = 'running'"}, "where must be a list of conditions"),
    ({"limit": 0}, "limit must be an int from 1 to 1000"),
    ({"limit": 1001}, "limit must be an int from 1 to 1000"),
    ({"limit": "10"}, "limit must be an int from 1 to 1000"),
    ({"limit": True}, "limit must be an int from 1 to 1000"),
    ({"order_by": ("down", "created_at")}, "order_by must be"),
    ({"order_by": ("desc", "name")}, "order_by must be"),
    ({"order_by": "created_at"}, "order_by must be"),
    ({"namespace": 5}, "namespace must be a str"),
]


@aio
async def test_bad_queries_raise_query_error_with_the_reason(app: ms.App) -> None:
    runs = Runs(app)
    await runs.add(plan="pro")
    store = await runs.store()
    for query, reason in BAD_QUERIES:
        with pytest.raises(QueryError, match=reason):
            await query_runs(store, **query)
    assert isinstance(QueryError("x"), ms.MainspringError)
    with pytest.raises(QueryError, match=r"where\[1\] 'in' on \['state'\]"):
        await query_runs(store, where=[("eq", attr("plan"), "pro"), ("in", ["state"], "x")])


INJECTIONS = [
    "a'); DROP TABLE ms_runs; --",
    "plan' OR '1'='1",
    "plan.x",
    "$",
    "$.plan",
    "*",
    "[0]",
    "plan[0]",
    "plan\\",
    "plan\n",
    "",
]


@aio
async def test_injected_keys_and_values_match_nothing_and_change_nothing(app: ms.App) -> None:
    runs = Runs(app)
    pro = await runs.add(plan="pro", tags=["vip"], plan_x=1, n=5)
    await runs.add(plan="team")
    for key in INJECTIONS:
        for op, value in [("eq", "pro"), ("ne", "pro"), ("gt", 0), ("contains", "vip")]:
            assert await runs.match((op, attr(key), value)) == set(), (op, key)
            assert await runs.match((op, ["attributes", "plan", key], value)) == set(), (op, key)
        assert await runs.match(("exists", attr(key))) == set(), key
        assert await runs.match(("in", attr(key), ["pro", "team"])) == set(), key
    for value in ["pro' OR '1'='1", "pro'; DROP TABLE ms_runs; --", '"pro"', "%", "pro\\"]:
        assert await runs.match(("eq", attr("plan"), value)) == set(), value
        assert await runs.match(("eq", ["state"], "available"), ("eq", ["id"], value)) == set()
    assert len(await runs.match()) == 2
    # such keys are data: a run that has one is found by it, and only by it
    odd = {key: key for key in INJECTIONS}
    holder = await runs.add(**odd)
    for key in INJECTIONS:
        assert await runs.match(("eq", attr(key), key)) == {holder}, key
        assert await runs.match(("exists", attr(key))) == {holder}, key
    assert await runs.match(("eq", attr("plan"), "pro")) == {pro}


# -- set_attributes ------------------------------------------------------------------


@aio
async def test_set_attributes_merges_top_level_keys(app: ms.App) -> None:
    runs = Runs(app)
    run_id = await runs.add(plan="pro", meta={"a": 1, "b": 2}, keep=True)
    store = await runs.store()
    before = await store.get_run(run_id)
    assert before is not None
    run = await set_attributes(
        store, run_id, {"plan": "team", "meta": {"c": 3}, "gone": None, "città": "Köln"}
    )
    expected = {"plan": "team", "meta": {"c": 3}, "keep": True, "gone": None, "città": "Köln"}
    assert run.id == run_id and run.attributes == expected
    stored = await store.get_run(run_id)
    assert stored is not None and stored.attributes == expected
    assert stored.updated_at >= before.updated_at
    assert (stored.state, stored.attempt, stored.input) == (before.state, 0, before.input)
    assert await runs.match(("eq", attr("plan"), "team")) == {run_id}
    assert await runs.match(("eq", attr("plan"), "pro")) == set()
    assert await runs.match(("eq", ["attributes", "meta", "c"], 3)) == {run_id}
    assert await runs.match(("exists", ["attributes", "meta", "a"])) == set()
    assert await runs.match(("eq", attr("città"), "Köln")) == {run_id}
    assert (await set_attributes(store, run_id, {})).attributes == expected


@aio
async def test_set_attributes_refuses_missing_runs_and_values_that_are_not_json(
    app: ms.App,
) -> None:
    runs = Runs(app)
    run_id = await runs.add(plan="pro")
    store = await runs.store()
    with pytest.raises(ms.RunNotFound, match="no run has id 'nope'"):
        await set_attributes(store, "nope", {"plan": "team"})
    with pytest.raises(ms.EncodeError, match="not JSON encodable"):
        await set_attributes(store, run_id, {"plan": "team", "when": object()})
    with pytest.raises(ms.EncodeError):
        await set_attributes(store, run_id, {1: "team"})  # type: ignore[dict-item]
    with pytest.raises(ms.EncodeError, match="must be a dict"):
        await set_attributes(store, run_id, ["plan", "team"])  # type: ignore[arg-type]
    run = await store.get_run(run_id)
    assert run is not None and run.attributes == {"plan": "pro"}


# -- PostgreSQL: the indexes serve the common queries ------------------------------------

_MANY_RUNS = """
INSERT INTO ms_runs (id, kind, name, namespace, queue, state, attributes, created_at, started_at)
SELECT lpad(i::text, 8, '0'), 'workflow', 'search.flow', 'ns' || (i % 17), 'default',
       CASE WHEN i % 500 = 0 THEN 'waiting'
            ELSE (ARRAY['scheduled', 'available', 'running',
                        'completed', 'failed', 'cancelled'])[1 + i % 6] END,
       jsonb_build_object('customer_id', 'cus_' || i,
                          'plan', (ARRAY['free', 'pro', 'team', 'enterprise'])[1 + i % 4],
                          'tags', jsonb_build_array('t' || (i % 50))),
       now() - make_interval(secs => i),
       CASE WHEN i % 7 >= 2 THEN now() - make_interval(secs => i) END
FROM generate_series(1, 20000) AS i
"""


@aio
async def test_common_filters_are_served_by_indexes(pg_url: str) -> None:
    app = ms.App(pg_url)
    try:
        await _explain_common_filters(app)
    finally:
        await app.aclose()


async def _explain_common_filters(app: ms.App) -> None:
    store = await app.store()
    await store.execute_script(_MANY_RUNS)
    await store.execute_script("VACUUM ANALYZE ms_runs")  # as autovacuum leaves it
    since = datetime.now(UTC) - timedelta(hours=1)
    queries: dict[str, dict[str, Any]] = {
        "eq on an attribute": {"where": [("eq", attr("customer_id"), "cus_4242")]},
        "eq on an attribute in a namespace": {
            "namespace": "ns9",
            "where": [("eq", attr("customer_id"), "cus_4242")],
        },
        "in on an attribute": {"where": [("in", attr("customer_id"), ["cus_1", "cus_2"])]},
        "contains on an attribute": {"where": [("contains", attr("tags"), "t7")]},
        "namespace and state": {
            "namespace": "ns3",
            "where": [("in", ["state"], ["running", "waiting"])],
        },
        "namespace and a rare state": {"namespace": "ns0", "where": [("eq", ["state"], "waiting")]},
        "namespace and state, by started_at": {
            "namespace": "ns3",
            "where": [("eq", ["state"], "completed")],
            "order_by": ("desc", "started_at"),
        },
        "namespace by started_at since": {
            "namespace": "ns3",
            "where": [("gte", ["started_at"], since)],
            "order_by": ("desc", "started_at"),
        },
        "namespace by created_at": {"namespace": "ns3"},
    }
    pool = store.pool  # type: ignore[attr-defined]
    for title, query in queries.items():
        first = await query_runs(store, limit=10, **query)
        assert first.items, title
        # the next page adds its keyset condition
        for cursor in [None] + ([first.next_cursor] if first.next_cursor else []):
            compiled = compile_query("postgres", limit=10, cursor=cursor, **query)
            rows = await pool.fetch("EXPLAIN " + compiled.sql, *compiled.params)
            explained = "\n".join(r[0] for r in rows)
            print(f"\n-- {title}, {'next page' if cursor else 'first page'}")
            print(f"{compiled.sql}\n{explained}")
            assert "Seq Scan on ms_runs" not in explained, (title, explained)
            assert "Index" in explained, (title, explained)
            if "namespace" not in query:
                assert "ms_runs_attributes" in explained, (title, explained)
    page = await query_runs(store, where=queries["eq on an attribute"]["where"])
    assert [run.attributes["customer_id"] for run in page.items] == ["cus_4242"]
