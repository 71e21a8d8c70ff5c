"""Scatter/gather: fan an asset out over keys discovered at run time, then gather.

An asset with `scatter=fn` runs `fn(**upstream values)` to get N keys, then
one instance run per key (a child run of the materialization, so cancelling
the materialization cancels its pending instances). Keys are serialized
deterministically and hashed (`ScatterKey`); a key already completed from the
same upstream materializations is skipped when the asset is materialized
again. The Spawn fan-in is the barrier: the gather step runs exactly once,
when the last instance is terminal. The asset's value maps each ScatterKey
to its instance's result; a downstream asset declares `gather=True` to
receive it.
"""

from __future__ import annotations

import base64
import hashlib
import zlib
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from mainspring import payload
from mainspring.backoff import Backoff
from mainspring.errors import ConfigError, EncodeError
from mainspring.ratelimits import RateLimitRef, bucket_key

_INLINE = 8192  # bytes of JSON: larger instance results travel compressed


@dataclass(frozen=True, slots=True)
class ScatterOptions:
    """How a scatter's instances run.

    - `max_concurrent`: instances running at once across every node (enforced in
      the claim, through a global limit on the instances' queue).
    - `rate_limit`: a configured rate limit ("name" or (name, partition)) each
      instance takes `weight` tokens from before it starts.
    - `failure_threshold` and `failure_mode`: with "partial", the scatter
      succeeds with the successful subset while failed / run <= threshold;
      "all_or_nothing" (the default) fails it on any failed instance.
    - `max_attempts`, `retry_strategy`, `timeout` (seconds): per instance.
    - `queue`, `priority`: where instances are claimed from; with
      max_concurrent and no queue, a queue of their own ("scatter.<asset>").
    """

    max_concurrent: int | None = None
    rate_limit: RateLimitRef | None = None
    weight: int = 1
    failure_threshold: float = 0.0
    failure_mode: Literal["partial", "all_or_nothing"] = "all_or_nothing"
    max_attempts: int = 3
    retry_strategy: Backoff | None = None
    queue: str | None = None
    priority: int = 0
    timeout: float | None = 1800.0

    def __post_init__(self) -> None:
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ConfigError(
                f"ScatterOptions: max_concurrent must be >= 1, got {self.max_concurrent}"
            )
        if not 0.0 <= self.failure_threshold <= 1.0:
            raise ConfigError("ScatterOptions: failure_threshold is a fraction from 0 to 1")
        if self.failure_mode not in ("partial", "all_or_nothing"):
            raise ConfigError("ScatterOptions: failure_mode is 'partial' or 'all_or_nothing'")
        if self.max_attempts < 1:
            raise ConfigError("ScatterOptions: max_attempts must be >= 1")
        if self.rate_limit is not None:
            bucket_key(self.rate_limit)

    def accepts(self, failed: int, ran: int) -> bool:
        """Whether a scatter with `failed` of `ran` instances failed may continue."""
        if failed == 0:
            return True
        return self.failure_mode == "partial" and failed / max(1, ran) <= self.failure_threshold


class ScatterKey:
    """A scatter key: its value, its canonical JSON (sorted keys) and the hash of that.

    Equal values give equal keys on every node and in every run, which is what
    lets a materialization skip keys already done. Indexing reads the value
    (`key["region"]`), so a gather can use keys like the dicts they came from.
    """

    __slots__ = ("canonical", "hash", "value")

    def __init__(self, value: Any) -> None:
        try:
            self.canonical = orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
        except TypeError as exc:
            raise EncodeError(
                f"a scatter key must be JSON encodable, got {value!r}: {exc}"
            ) from None
        self.value = payload.loads(self.canonical)
        self.hash = hashlib.sha256(self.canonical.encode()).hexdigest()[:32]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ScatterKey) and other.hash == self.hash

    def __hash__(self) -> int:
        return hash(self.hash)

    def __getitem__(self, item: Any) -> Any:
        return self.value[item]

    def __repr__(self) -> str:
        return f"ScatterKey({self.canonical})"


def scatter_keys(values: Any) -> list[ScatterKey]:
    """The distinct keys a scatter function returned, in first-seen order."""
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__iter__"):
        raise ConfigError(f"a scatter function returns an iterable of keys, got {values!r}")
    seen: dict[str, ScatterKey] = {}
    for value in values:
        key = value if isinstance(value, ScatterKey) else ScatterKey(value)
        seen.setdefault(key.hash, key)
    return list(seen.values())


def encode_result(value: Any) -> Any:
    """An instance's result as its run's output: JSON, compressed when large."""
    text = payload.dumps(value)
    if len(text) <= _INLINE:
        return {"r": value}
    return {"z": base64.b64encode(zlib.compress(text.encode(), 1)).decode()}


def result_bytes(output: Any) -> tuple[bytes, bool]:
    """The stored form of an instance's output: (bytes, compressed)."""
    if "z" in output:
        return base64.b64decode(output["z"]), True
    return payload.dumps(output["r"]).encode(), False


def decode_result(data: bytes | None, compressed: bool) -> Any:
    if data is None:
        return None
    return payload.loads(zlib.decompress(data) if compressed else data)
