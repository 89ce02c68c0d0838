"""enginehouse's actors: the EngineRegistry, the Janitor, their Supervisor,
and the restart policy they share. Each talks only through :mod:`messages`."""

from enginehouse.actors.counters import count_value
from enginehouse.actors.janitor import Janitor
from enginehouse.actors.policy import RestartLedger, RestartPolicy, RestartType
from enginehouse.actors.registry import EngineRegistry, Snapshot
from enginehouse.actors.supervisor import ChildSpec, Supervisor

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
