"""Integrations with the frameworks enginehouse runs inside.

One module each: :mod:`~enginehouse.integrations.flask` (Flask and Superset
settings), :mod:`~enginehouse.integrations.asgi` (FastAPI/Starlette lifespan),
:mod:`~enginehouse.integrations.workers` (gunicorn and Celery fork hooks),
:mod:`~enginehouse.integrations.metrics` (Prometheus). Each imports the facade,
never the other way round.
"""
