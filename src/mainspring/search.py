"""Search attributes and the run query: find runs by their columns and their attributes.

A run's `attributes` is a JSON object the application owns: given at enqueue or
start, merged later by `set_attributes`, never read by the engine. `query_runs`
compiles a list of conditions into one SELECT on ms_runs:

    where=[("eq", ["attributes", "plan"], "pro"), ("in", ["state"], ["running", "waiting"]),
           ("gte", ["started_at"], since), ("contains", ["attributes", "tags"], "vip")]

A path is a run column (`["state"]`) or keys under attributes
(`["attributes", "customer", "tier"]`: the key "tier" of the object under
"customer"; keys are object keys only, never array positions, and may not
hold a double quote, which SQLite's JSON paths cannot express). Operators:

- eq, ne: equal / different. Attribute values are JSON scalars (str, int,
  float, bool, None) compared with their type: 1 never equals "1" or True.
- gt, gte, lt, lte: numbers with numbers and strings with strings (attributes);
  a column's own type (str, int, aware datetime) for columns. Strings compare
  in the database's collation on PostgreSQL, by code point on SQLite.
- in: a list of values (at most MAX_IN); matches when eq matches one of them.
- contains: attributes only: the array at the path has an element equal to the
  value (a JSON scalar).
- exists: `("exists", path)` the path is present (a JSON null counts), the
  column is not NULL; `("exists", path, False)` the opposite.
A condition other than `exists` never matches a missing path or a NULL column.

Guarantees:
- Values and attribute keys are always bound parameters. The SQL text holds
  only allowlisted column names, placeholders and constants of this module, so
  no input can change what a statement does.
- Both backends give the same answers to the same query (up to string collation).
- Pages are keyset pages ordered by (column, id): following next_cursor lists
  every run that existed when the first page was read exactly once, however
  many runs are inserted meanwhile. That holds for the immutable order columns
  (created_at, id); a run whose order column changes between two pages can move
  across the cursor. Ordering by a nullable column (started_at, finished_at)
  lists only the runs where it is set.
- On PostgreSQL, migration 0004 indexes the common forms: eq, in and contains
  on attributes (GIN, jsonb_path_ops, through `attributes @> ...`), a namespace's
  runs by state, and a namespace's runs in created_at or started_at order.
"""

from __future__ import annotations

import base64
import binascii
import math
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import orjson

from mainspring import payload
from mainspring.errors import EncodeError, MainspringError, RunNotFound
from mainspring.run import STATES, Run
from mainspring.store.base import Store
from mainspring.store.postgres import PostgresStore
from mainspring.store.postgres import _run as postgres_run
from mainspring.store.sqlite import SqliteStore
from mainspring.store.sqlite import _run as sqlite_run


class QueryError(MainspringError, ValueError):
    """A run query is malformed (operator, path, value, limit or cursor); nothing was run."""


_TEXT: Final = "text"
_INT: Final = "integer"
_TIME: Final = "time"

# The run columns a query may filter on, with the type of their values.
COLUMNS: Final[Mapping[str, str]] = {
    "id": _TEXT,
    "kind": _TEXT,
    "name": _TEXT,
    "namespace": _TEXT,
    "queue": _TEXT,
    "state": _TEXT,
    "priority": _INT,
    "attempt": _INT,
    "max_attempts": _INT,
    "run_at": _TIME,
    "created_at": _TIME,
    "started_at": _TIME,
    "finished_at": _TIME,
    "updated_at": _TIME,
    "correlation_key": _TEXT,
    "concurrency_key": _TEXT,
    "rate_limit": _TEXT,
    "parent_id": _TEXT,
    "step": _TEXT,
}
ORDER_COLUMNS: Final = ("created_at", "started_at", "finished_at", "updated_at", "id", "priority")
OPERATORS: Final = ("eq", "ne", "gt", "gte", "lt", "lte", "in", "contains", "exists")
KINDS: Final = frozenset({"job", "machine", "workflow", "asset", "process"})
MAX_LIMIT: Final = 1000
MAX_IN: Final = 1000

_NULLABLE_ORDER: Final = frozenset({"started_at", "finished_at"})
_COMPARE: Final = {"eq": "=", "ne": "<>", "gt": ">", "gte": ">=", "lt": "<", "lte": "<="}
_RANGE: Final = frozenset({"gt", "gte", "lt", "lte"})
_INT64: Final = 2**63


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a query: its runs, and the cursor of the next page (None on the last)."""

    items: list[Run]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class CompiledQuery:
    """The SELECT a query runs, with its bound parameters (for the store, EXPLAIN and logs)."""

    sql: str
    params: list[Any]
    order_column: str
    descending: bool
    limit: int


@dataclass(frozen=True, slots=True)
class _Condition:
    """One checked condition: on a run column, or (column None) on keys under attributes."""

    op: str
    column: str | None
    keys: tuple[str, ...]
    value: Any


# -- the API -----------------------------------------------------------------------


async def query_runs(
    store: Store,
    *,
    namespace: str | None = None,
    where: Iterable[Sequence[Any]] = (),
    order_by: Sequence[str] = ("desc", "created_at"),
    limit: int = 50,
    cursor: str | None = None,
    kind: str | None = "workflow",
) -> Page:
    """The runs matching every condition, `limit` at a time; see the module doc.

    `namespace` None queries every namespace. `kind` is "workflow" by default:
    search attributes are a workflow feature, and the search indexes hold
    workflow runs only (so jobs never pay for them); another kind, or None for
    every kind, is answered without them. Pass a page's `next_cursor` with the
    same query to read the next page. Raises QueryError, naming the condition
    and the reason, before anything runs.
    """
    query = compile_query(
        store.backend,
        kind=kind,
        namespace=namespace,
        where=where,
        order_by=order_by,
        limit=limit,
        cursor=cursor,
    )
    rows, to_run = await _select(store, query.sql, query.params)
    next_cursor = None
    if len(rows) > query.limit:
        rows = rows[: query.limit]
        last = rows[-1]
        next_cursor = _encode_cursor(query, last[query.order_column], last["id"])
    return Page([to_run(row) for row in rows], next_cursor)


# The statements of set_attributes. PostgreSQL's jsonb || is the top-level merge
# itself; SQLite's json_patch would merge nested objects and drop null keys
# (RFC 7396), so SQLite merges in Python inside one write transaction.
_PG_SET_ATTRIBUTES: Final = """
UPDATE ms_runs SET attributes = attributes || $2::jsonb, updated_at = now()
WHERE id = $1
RETURNING *
"""
_SQLITE_GET_ATTRIBUTES: Final = "SELECT attributes FROM ms_runs WHERE id = ?1"
_SQLITE_SET_ATTRIBUTES: Final = """
UPDATE ms_runs SET attributes = ?1, updated_at = ?2
WHERE id = ?3
RETURNING *
"""


async def set_attributes(store: Store, run_id: str, attributes: Mapping[str, Any]) -> Run:
    """Merge `attributes` into the run's attributes (top level: each given key is replaced).

    Nested objects are replaced whole, and None is stored as JSON null. Only the
    row changes (and its updated_at): no journal event, nothing a replay sees.
    Raises EncodeError, before anything is written, when the values are not
    JSON, and RunNotFound when no run has this id.
    """
    if not isinstance(attributes, Mapping):
        raise EncodeError(
            f"attributes must be a dict of JSON values, got {type(attributes).__name__}"
        )
    added = dict(attributes)
    patch = payload.dumps(added)
    run: Run | None
    if isinstance(store, PostgresStore):
        row = await store.pool.fetchrow(_PG_SET_ATTRIBUTES, run_id, patch)
        run = None if row is None else postgres_run(row)
    elif isinstance(store, SqliteStore):
        run = await store._write(lambda con: _merge_sqlite(con, run_id, added))
    else:
        raise MainspringError(f"search does not support the {store.backend!r} backend")
    if run is None:
        raise RunNotFound(f"no run has id {run_id!r} (it may have been garbage-collected)")
    return run


def _merge_sqlite(con: sqlite3.Connection, run_id: str, added: dict[str, Any]) -> Run | None:
    """set_attributes on SQLite, inside the caller's write transaction."""
    found = con.execute(_SQLITE_GET_ATTRIBUTES, (run_id,)).fetchone()
    if found is None:
        return None
    merged = payload.dumps({**payload.loads(found[0]), **added})
    rows = con.execute(_SQLITE_SET_ATTRIBUTES, (merged, time.time(), run_id)).fetchall()
    return sqlite_run(rows[0])


async def _select(
    store: Store, sql: str, params: list[Any]
) -> tuple[list[Any], Callable[[Any], Run]]:
    """The rows of a SELECT on the store's own connection, and how to make a Run of one."""
    if isinstance(store, PostgresStore):
        return list(await store.pool.fetch(sql, *params)), postgres_run
    if isinstance(store, SqliteStore):
        rows = await store._call(lambda: store.con.execute(sql, params).fetchall())
        return rows, sqlite_run
    raise MainspringError(f"search does not support the {store.backend!r} backend")


# -- compiling a query -----------------------------------------------------------


def compile_query(
    backend: str,
    *,
    kind: str | None = "workflow",
    namespace: str | None = None,
    where: Iterable[Sequence[Any]] = (),
    order_by: Sequence[str] = ("desc", "created_at"),
    limit: int = 50,
    cursor: str | None = None,
) -> CompiledQuery:
    """The SELECT of a query on `backend` ("postgres" or "sqlite"); raises QueryError.

    It fetches one row more than `limit`: that row only tells whether a next page exists.
    """
    sql = _dialect(backend)
    direction, column = _order(order_by)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise QueryError(f"limit must be an int from 1 to {MAX_LIMIT}, got {limit!r}")
    filters: list[str] = []
    if kind is not None:
        if kind not in KINDS:
            raise QueryError(f"kind must be one of {sorted(KINDS)} or None, got {kind!r}")
        # A literal from the allowlist, not a parameter: the partial search
        # indexes (WHERE kind = 'workflow') are then provably usable.
        filters.append(f"kind = '{kind}'")
    if namespace is not None:
        if not isinstance(namespace, str):
            raise QueryError(f"namespace must be a str or None, got {namespace!r}")
        filters.append(f"namespace = {sql.value(_TEXT, namespace)}")
    if isinstance(where, (str, bytes, Mapping)):
        raise QueryError(f"where must be a list of conditions, got {where!r}")
    for index, item in enumerate(where):
        condition = _condition(f"where[{index}]", item)
        if condition.column is None:
            filters.append(sql.attribute(condition))
        else:
            filters.append(_column_filter(sql, condition))
    if column in _NULLABLE_ORDER:
        filters.append(f"{column} IS NOT NULL")
    descending = direction == "desc"
    if cursor is not None:
        after, after_id = _decode_cursor(cursor, backend, direction, column)
        sign = "<" if descending else ">"
        if column == "id":
            filters.append(f"id {sign} {sql.stored(_TEXT, after_id)}")
        else:
            filters.append(
                f"({column}, id) {sign} "
                f"({sql.stored(COLUMNS[column], after)}, {sql.stored(_TEXT, after_id)})"
            )
    keys = ("id",) if column == "id" else (column, "id")
    order = ", ".join(f"{key} {direction.upper()}" for key in keys)
    text = "SELECT * FROM ms_runs"
    if filters:
        text += "\nWHERE " + "\n  AND ".join(f"({f})" for f in filters)
    text += f"\nORDER BY {order}\nLIMIT {sql.bind(limit + 1)}"
    return CompiledQuery(text, sql.params, column, descending, limit)


def _order(order_by: Sequence[str]) -> tuple[str, str]:
    if (
        isinstance(order_by, str)
        or not isinstance(order_by, Sequence)
        or len(order_by) != 2
        or order_by[0] not in ("asc", "desc")
        or order_by[1] not in ORDER_COLUMNS
    ):
        raise QueryError(
            f"order_by must be ('asc' or 'desc', column) with a column among "
            f"{', '.join(ORDER_COLUMNS)}; got {order_by!r}"
        )
    return order_by[0], order_by[1]


def _condition(where: str, item: Any) -> _Condition:
    """Check one (op, path, value) condition and normalise its value; raises QueryError."""
    if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
        raise QueryError(
            f"{where}: a condition is (operator, path, value) or ('exists', path), got {item!r}"
        )
    op, path = item[0], item[1]
    if op not in OPERATORS:
        raise QueryError(f"{where}: unknown operator {op!r}; use one of {', '.join(OPERATORS)}")
    if len(item) == 2 and op != "exists":
        raise QueryError(f"{where}: {op!r} needs a value: ({op!r}, path, value)")
    value = item[2] if len(item) == 3 else True
    column, keys = _path(where, path)
    where = f"{where} {op!r} on {list(path)!r}"
    if op == "exists":
        if not isinstance(value, bool):
            raise QueryError(f"{where}: takes True (present) or False (absent), got {value!r}")
    elif op == "contains":
        if column is not None:
            raise QueryError(
                f"{where}: 'contains' tests an array under attributes; "
                f"for column {column!r} use 'eq' or 'in'"
            )
        value = _value(where, op, None, value)
    elif op == "in":
        if not isinstance(value, (list, tuple)):
            raise QueryError(f"{where}: 'in' needs a list of values, got {value!r}")
        if len(value) > MAX_IN:
            raise QueryError(f"{where}: 'in' takes at most {MAX_IN} values, got {len(value)}")
        value = tuple(_value(where, op, column, v) for v in value)
    else:
        value = _value(where, op, column, value)
    return _Condition(op, column, keys, value)


def _path(where: str, path: Any) -> tuple[str | None, tuple[str, ...]]:
    """(column, ()) for a run column, (None, keys) for a path under attributes."""
    if (
        not isinstance(path, (list, tuple))
        or not path
        or not all(isinstance(key, str) for key in path)
    ):
        raise QueryError(
            f"{where}: a path is a list of str such as ['state'] or ['attributes', 'plan'], "
            f"got {path!r}"
        )
    head, *keys = path
    if head == "attributes":
        if not keys:
            raise QueryError(
                f"{where}: name a key under attributes, such as ['attributes', 'plan']"
            )
        for key in keys:
            # SQLite's JSON paths cannot hold a double quote inside a key; refused
            # on both backends so that they answer alike.
            if '"' in key:
                raise QueryError(
                    f"{where}: attribute key {key!r} contains a double quote, which queries "
                    "cannot address; rename the attribute"
                )
        return None, tuple(keys)
    if head not in COLUMNS:
        raise QueryError(
            f"{where}: unknown column {head!r}; query one of {', '.join(COLUMNS)}, "
            "or a path under 'attributes'"
        )
    if keys:
        raise QueryError(f"{where}: column {head!r} holds no keys; only attributes does")
    return head, ()


def _value(where: str, op: str, column: str | None, value: Any) -> Any:
    """The value of one comparison, checked against what the path holds."""
    if column is None:
        if op in _RANGE:
            if isinstance(value, str) or _number(value):
                return value
            raise QueryError(f"{where}: compares with a number or a str, got {value!r}")
        if value is None or isinstance(value, (str, bool)) or _number(value):
            return value
        raise QueryError(
            f"{where}: attribute values are JSON scalars (str, int, float, bool, None), "
            f"got {value!r}"
        )
    if value is None:
        raise QueryError(
            f"{where}: a NULL column matches ('exists', [{column!r}], False), not a None value"
        )
    kind = COLUMNS[column]
    if kind == _TEXT:
        if not isinstance(value, str):
            raise QueryError(f"{where}: column {column!r} holds str, got {value!r}")
        if column == "state" and value not in STATES:
            raise QueryError(f"{where}: unknown state {value!r}; states are {', '.join(STATES)}")
    elif kind == _INT:
        if isinstance(value, bool) or not isinstance(value, int) or not _number(value):
            raise QueryError(f"{where}: column {column!r} holds int, got {value!r}")
    elif not isinstance(value, datetime) or value.tzinfo is None:
        raise QueryError(
            f"{where}: column {column!r} holds times; pass an aware datetime "
            f"(for example datetime.now(UTC)), got {value!r}"
        )
    return value


def _number(value: Any) -> bool:
    """A finite int or float that both databases can hold (not a bool)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -_INT64 <= value < _INT64
    return isinstance(value, float) and math.isfinite(value)


def _column_filter(sql: _Dialect, c: _Condition) -> str:
    """A condition on a run column: the same SQL on both backends but for `in`."""
    assert c.column is not None
    kind = COLUMNS[c.column]
    if c.op == "exists":
        return _null_test(c.column, present=c.value)
    if c.op == "in":
        return sql.column_in(c.column, kind, c.value)
    return f"{c.column} {_COMPARE[c.op]} {sql.value(kind, c.value)}"


def _null_test(expression: str, *, present: bool) -> str:
    return f"{expression} IS NOT NULL" if present else f"{expression} IS NULL"


def _any(conditions: Iterable[str]) -> str:
    """Conditions joined by OR (FALSE for none: `in` with an empty list matches nothing)."""
    parts = [f"({c})" for c in conditions]
    return "(" + " OR ".join(parts) + ")" if parts else "FALSE"


def _nest(keys: Sequence[str], leaf: Any) -> Any:
    """{"k1": {"k2": leaf}} for keys ("k1", "k2")."""
    for key in reversed(keys):
        leaf = {key: leaf}
    return leaf


# -- the two dialects ----------------------------------------------------------------


class _Dialect:
    """One statement's SQL for one backend: fragments in, bound parameters collected."""

    mark: str  # placeholders are mark + position: $1 (PostgreSQL), ?1 (SQLite)

    def __init__(self) -> None:
        self.params: list[Any] = []

    def bind(self, value: Any) -> str:
        """The placeholder of a new bound parameter."""
        self.params.append(value)
        return f"{self.mark}{len(self.params)}"

    def value(self, kind: str, value: Any) -> str:
        """The placeholder of a column value given as the user gave it."""
        return self.stored(kind, self.to_stored(kind, value))

    def to_stored(self, kind: str, value: Any) -> Any:
        """A column value as the backend stores it."""
        return value

    def stored(self, kind: str, value: Any) -> str:
        """The placeholder of a column value already as stored (a cursor's value)."""
        return self.bind(value)

    def column_in(self, column: str, kind: str, values: Sequence[Any]) -> str:
        raise NotImplementedError

    def attribute(self, c: _Condition) -> str:
        raise NotImplementedError


class _Postgres(_Dialect):
    """PostgreSQL: attributes is jsonb.

    eq, in and contains are written as `attributes @> doc`, so the GIN index
    (jsonb_path_ops) serves them; the other operators read the value with `->`
    and one text key per level, which addresses object keys only.
    """

    mark = "$"
    _CASTS: Final = {_TEXT: "text", _INT: "bigint", _TIME: "timestamptz"}

    def stored(self, kind: str, value: Any) -> str:
        return f"{self.bind(value)}::{self._CASTS[kind]}"

    def column_in(self, column: str, kind: str, values: Sequence[Any]) -> str:
        return f"{column} = ANY({self.bind(list(values))}::{self._CASTS[kind]}[])"

    def attribute(self, c: _Condition) -> str:
        if c.op == "eq":
            return self._equals(c.keys, c.value)
        if c.op == "in":
            return _any(self._equals(c.keys, v) for v in c.value)
        if c.op == "contains":
            return f"attributes @> {self.json(_nest(c.keys, [c.value]))}"
        at = "(attributes" + "".join(f" -> {self.bind(k)}::text" for k in c.keys) + ")"
        if c.op == "exists":
            return _null_test(at, present=c.value)
        if c.op == "ne":
            return f"{at} <> {self.json(c.value)}"
        kind = "string" if isinstance(c.value, str) else "number"
        return f"jsonb_typeof({at}) = '{kind}' AND {at} {_COMPARE[c.op]} {self.json(c.value)}"

    def _equals(self, keys: Sequence[str], value: Any) -> str:
        return f"attributes @> {self.json(_nest(keys, value))}"

    def json(self, value: Any) -> str:
        return f"{self.bind(payload.dumps(value))}::jsonb"


class _Sqlite(_Dialect):
    """SQLite: attributes is JSON text; times are epoch seconds.

    A value is read at a bound path with json_type (its JSON type, NULL when the
    path is missing) and json_extract (its SQL value).
    """

    mark = "?"

    def to_stored(self, kind: str, value: Any) -> Any:
        return value.timestamp() if kind == _TIME else value

    def column_in(self, column: str, kind: str, values: Sequence[Any]) -> str:
        stored = orjson.dumps([self.to_stored(kind, v) for v in values]).decode()
        return f"{column} IN (SELECT value FROM json_each({self.bind(stored)}))"

    def attribute(self, c: _Condition) -> str:
        path = self.bind("$" + "".join(f'."{_label(k)}"' for k in c.keys))
        kind, value = f"json_type(attributes, {path})", f"json_extract(attributes, {path})"
        if c.op == "exists":
            return _null_test(kind, present=c.value)
        if c.op == "eq":
            return self._equals(kind, value, c.value)
        if c.op == "ne":
            return f"{kind} IS NOT NULL AND NOT ({self._equals(kind, value, c.value)})"
        if c.op == "in":
            return _any(self._equals(kind, value, v) for v in c.value)
        if c.op == "contains":
            element = self._equals("e.type", "e.value", c.value)
            return (
                f"{kind} = 'array' AND "
                f"EXISTS (SELECT 1 FROM json_each(attributes, {path}) AS e WHERE {element})"
            )
        types = "'text'" if isinstance(c.value, str) else "'integer', 'real'"
        return f"{kind} IN ({types}) AND {value} {_COMPARE[c.op]} {self.bind(c.value)}"

    def _equals(self, kind: str, value: str, expected: Any) -> str:
        """The JSON value whose type is `kind` and SQL value `value` equals `expected`."""
        if expected is None:
            return f"{kind} = 'null'"
        if isinstance(expected, bool):
            return f"{kind} = 'true'" if expected else f"{kind} = 'false'"
        types = "'text'" if isinstance(expected, str) else "'integer', 'real'"
        return f"{kind} IN ({types}) AND {value} = {self.bind(expected)}"


def _label(key: str) -> str:
    """A key as a quoted SQLite JSON path label matches it: in its JSON escaping.

    SQLite compares a label with a key's text as stored, and attributes are
    stored as orjson writes them; a label ends at the next double quote (keys
    holding one are refused), so dots, brackets and quotes cannot change the path.
    """
    return orjson.dumps(key).decode()[1:-1]


def _dialect(backend: str) -> _Dialect:
    if backend == "postgres":
        return _Postgres()
    if backend == "sqlite":
        return _Sqlite()
    raise MainspringError(f"search does not support the {backend!r} backend")


# -- cursors -------------------------------------------------------------------------


def _encode_cursor(query: CompiledQuery, value: Any, run_id: str) -> str:
    """An opaque cursor: the order and the last row's (order value as stored, id)."""
    if isinstance(value, datetime):
        value = value.isoformat()
    direction = "desc" if query.descending else "asc"
    raw = orjson.dumps({"by": [direction, query.order_column], "after": [value, run_id]})
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: Any, backend: str, direction: str, column: str) -> tuple[Any, str]:
    """(order value as stored, id) of a cursor made for this order; raises QueryError."""
    bad = f"cursor {cursor!r} is not a next_cursor of this query"
    try:
        if not isinstance(cursor, str):
            raise ValueError
        data = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        (made_direction, made_column), (value, run_id) = data["by"], data["after"]
    except (binascii.Error, ValueError, TypeError, KeyError):
        raise QueryError(bad) from None
    if [made_direction, made_column] != [direction, column]:
        raise QueryError(
            f"{bad}: it pages order_by=({made_direction!r}, {made_column!r}); "
            "pass the order_by it came from"
        )
    kind = COLUMNS[column]
    if kind == _TIME and backend == "postgres" and isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise QueryError(bad) from None
    valid = {
        _TEXT: isinstance(value, str),
        _INT: isinstance(value, int) and not isinstance(value, bool),
        _TIME: (
            isinstance(value, datetime) and value.tzinfo is not None
            if backend == "postgres"
            else isinstance(value, (int, float)) and not isinstance(value, bool)
        ),
    }[kind]
    if not valid or not isinstance(run_id, str):
        raise QueryError(bad)
    return value, run_id
