"""The cluster layer: processes placed on nodes, process groups, a registry and a KV."""

from mainspring.cluster.groups import GroupEvent, GroupMonitor, GroupOverflow, Groups, Scope
from mainspring.cluster.hooks import Hooks
from mainspring.cluster.hub import ChildInfo, Hub, StartResult, StopResult
from mainspring.cluster.kv import KV, KVChange, KVOverflow, Watch
from mainspring.cluster.migration import ColdSwap, HotSwap
from mainspring.cluster.node import Cluster
from mainspring.cluster.process import ChildSpec, Pid, Process
from mainspring.cluster.quorum import MajorityQuorum, StaticQuorum
from mainspring.cluster.registry import Registry
from mainspring.cluster.strategies import ConsistentHashing, Guided, Replication, Singularity

__all__ = [
    "KV",
    "ChildInfo",
    "ChildSpec",
    "Cluster",
    "ColdSwap",
    "ConsistentHashing",
    "GroupEvent",
    "GroupMonitor",
    "GroupOverflow",
    "Groups",
    "Guided",
    "Hooks",
    "HotSwap",
    "Hub",
    "KVChange",
    "KVOverflow",
    "MajorityQuorum",
    "Pid",
    "Process",
    "Registry",
    "Replication",
    "Scope",
    "Singularity",
    "StartResult",
    "StaticQuorum",
    "StopResult",
    "Watch",
]
