"""The typed, immutable messages that enginehouse's actors exchange.

One module per conversation: :mod:`messages.registry` (callers and the Janitor
with the EngineRegistry), :mod:`messages.janitor` (the Janitor's timer),
:mod:`messages.supervision` (children with their Supervisor).
"""
