"""IO managers: where an asset's values live. A materialization keeps a reference.

`DbIO()` (the default) keeps small JSON values inline in the materialization's
reference and larger ones in `ms_asset_values`, zlib-compressed when that
pays. `FileIO(dir)` writes one file per materialization and references its
path. A reference is JSON: {"io": "db", "value": ...}, {"io": "db", "key": ...}
or {"io": "file", "path": ..., "format": ...}.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import zlib
from pathlib import Path
from typing import Any

from mainspring import payload
from mainspring.errors import ConfigError, EncodeError
from mainspring.store.base import Store

COMPRESS_OVER = 16_384  # bytes: larger blobs are zlib-compressed


def pack(data: bytes) -> tuple[bytes, bool]:
    """Bytes to store, compressed when large enough for it to pay."""
    if len(data) > COMPRESS_OVER:
        packed = zlib.compress(data, 1)
        if len(packed) < len(data):
            return packed, True
    return data, False


def unpack(data: bytes, compressed: bool) -> bytes:
    return zlib.decompress(data) if compressed else data


class IOManager:
    """Stores an asset's value and loads it back from the reference it returned."""

    async def store(self, store: Store, asset: str, partition: str, key: str, value: Any) -> Any:
        """Keep `value` (of materialization `key`); returns the JSON reference to record."""
        raise NotImplementedError

    async def load(self, store: Store, ref: Any) -> Any:
        """The value behind a reference this manager returned."""
        raise NotImplementedError


def _encode(asset: str, value: Any) -> bytes:
    try:
        return payload.dumps(value).encode()
    except EncodeError as exc:
        raise EncodeError(
            f"the value of asset {asset!r} is not JSON encodable ({exc}); "
            "return JSON data or use io=ms.FileIO(dir, format='pickle')"
        ) from None


class DbIO(IOManager):
    """Values in the database: inline up to `inline_limit` bytes of JSON, else out of line."""

    def __init__(self, inline_limit: int = 4096) -> None:
        self.inline_limit = inline_limit

    def __repr__(self) -> str:
        return f"DbIO(inline_limit={self.inline_limit})"

    async def store(self, store: Store, asset: str, partition: str, key: str, value: Any) -> Any:
        data = _encode(asset, value)
        if len(data) <= self.inline_limit:
            return {"io": "db", "value": value}
        blob, compressed = pack(data)
        await store.put_asset_value(key, blob, compressed)
        return {"io": "db", "key": key, "bytes": len(data)}

    async def load(self, store: Store, ref: Any) -> Any:
        if "value" in ref:
            return ref["value"]
        found = await store.get_asset_value(ref["key"])
        if found is None:
            raise ConfigError(f"the value {ref['key']!r} is gone from ms_asset_values")
        return payload.loads(unpack(*found))


class FileIO(IOManager):
    """One file per materialization under `directory`/asset/partition/, JSON or pickle.

    Files are written to a temporary name and renamed, so a reader never sees
    half a file. Every node that loads the value must see the same directory.
    """

    def __init__(self, directory: str | os.PathLike[str], *, format: str = "json") -> None:
        if format not in ("json", "pickle"):
            raise ConfigError(f"FileIO format is 'json' or 'pickle', got {format!r}")
        self.directory = Path(directory)
        self.format = format

    def __repr__(self) -> str:
        return f"FileIO({str(self.directory)!r}, format={self.format!r})"

    async def store(self, store: Store, asset: str, partition: str, key: str, value: Any) -> Any:
        data = _encode(asset, value) if self.format == "json" else pickle.dumps(value)
        suffix = "json" if self.format == "json" else "pickle"
        path = self.directory / _safe(asset) / (_safe(partition) or "_") / f"{key}.{suffix}"
        await asyncio.to_thread(_write_atomic, path, data)
        return {"io": "file", "path": str(path.resolve()), "format": self.format,
                "bytes": len(data)}  # fmt: skip

    async def load(self, store: Store, ref: Any) -> Any:
        data = await asyncio.to_thread(Path(ref["path"]).read_bytes)
        if ref.get("format", "json") == "pickle":
            return pickle.loads(data)
        return payload.loads(data)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in name)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
