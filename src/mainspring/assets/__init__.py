"""Asset pipelines: materializations with lineage, partitions, scatter/gather, signal gates."""

from mainspring.assets.asset import AssetContext, AssetDef
from mainspring.assets.catalog import Assets, Lineage, StalePartition
from mainspring.assets.gates import (
    Gate,
    GateClosed,
    GateError,
    GateExpired,
    GateHandle,
    GateNotFound,
    Gates,
    GateSignal,
    InvalidToken,
)
from mainspring.assets.io import DbIO, FileIO, IOManager
from mainspring.assets.partitions import (
    DailyPartitions,
    HourlyPartitions,
    MonthlyPartitions,
    Partitions,
    StaticPartitions,
    WeeklyPartitions,
)
from mainspring.assets.scatter import ScatterKey, ScatterOptions
from mainspring.store.base import MaterializationRow as Materialization

__all__ = [
    "AssetContext",
    "AssetDef",
    "Assets",
    "DailyPartitions",
    "DbIO",
    "FileIO",
    "Gate",
    "GateClosed",
    "GateError",
    "GateExpired",
    "GateHandle",
    "GateNotFound",
    "GateSignal",
    "Gates",
    "HourlyPartitions",
    "IOManager",
    "InvalidToken",
    "Lineage",
    "Materialization",
    "MonthlyPartitions",
    "Partitions",
    "ScatterKey",
    "ScatterOptions",
    "StalePartition",
    "StaticPartitions",
    "WeeklyPartitions",
]
