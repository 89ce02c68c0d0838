"""enginehouse's actors: the EngineRegistry, the Janitor, their Supervisor,
and the restart policy they share. Each talks only through :mod:`messages`."""

from actors.counters import count_value
from actors.janitor import Janitor
from actors.policy import RestartLedger, RestartPolicy, RestartType
from actors.registry import EngineRegistry, Snapshot
from actors.supervisor import ChildSpec, Supervisor

__all__ = [
    "ChildSpec",
    "EngineRegistry",
    "Janitor",
    "RestartLedger",
    "RestartPolicy",
    "RestartType",
    "Snapshot",
    "Supervisor",
    "count_value",
]
