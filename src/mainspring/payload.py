"""JSON payloads: encoding that fails early and names what could not be encoded."""

from __future__ import annotations

from typing import Any

import orjson

from mainspring.errors import EncodeError

_OPTS = orjson.OPT_SERIALIZE_NUMPY


def dumps(value: Any) -> str:
    """Encode a value as JSON text; raises EncodeError when it is not JSON encodable."""
    try:
        return orjson.dumps(value, option=_OPTS).decode()
    except TypeError as exc:
        raise EncodeError(f"value is not JSON encodable: {exc}") from None


def loads(text: str | bytes | None) -> Any:
    """Decode JSON text (None stays None)."""
    if text is None:
        return None
    return orjson.loads(text)


def encode_call(
    task_name: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    idempotency_key: str | None = None,
) -> str:
    """Encode a task call's arguments, naming the argument that is not JSON encodable.

    Raises EncodeError before anything is written, so a bad payload never
    reaches the database. A call's idempotency key travels with its input, so
    the worker that claims the run knows to look for a completed run first.
    """
    call: dict[str, Any] = {"args": args, "kwargs": kwargs}
    if idempotency_key is not None:
        call["idempotency_key"] = idempotency_key
    try:
        return orjson.dumps(call, option=_OPTS).decode()
    except TypeError:
        pass
    for index, value in enumerate(args):
        _check(task_name, f"positional argument {index}", value)
    for key, value in kwargs.items():
        _check(task_name, f"argument {key!r}", value)
    raise EncodeError(f"arguments of task {task_name!r} are not JSON encodable")


def _check(task_name: str, label: str, value: Any) -> None:
    try:
        orjson.dumps(value, option=_OPTS)
    except TypeError as exc:
        raise EncodeError(
            f"{label} of task {task_name!r} is not JSON encodable "
            f"({type(value).__name__}: {exc}); pass plain JSON values (dict, list, str, "
            "int, float, bool, None) and rebuild richer objects inside the task"
        ) from None
