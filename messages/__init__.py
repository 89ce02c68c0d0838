"""The typed, immutable messages that enginehouse's actors exchange.

One module per conversation: :mod:`enginehouse.messages.registry` (callers and the Janitor
with the EngineRegistry), :mod:`enginehouse.messages.janitor` (the Janitor's timer),
:mod:`enginehouse.messages.supervision` (children with their Supervisor).
"""
