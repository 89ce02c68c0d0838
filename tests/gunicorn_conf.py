"""gunicorn config for tests/test_gunicorn.py: the documented one-line hook import."""

from enginehouse.integrations.workers import (  # noqa: F401  (gunicorn finds them by name)
    child_exit,
    post_fork,
    worker_exit,
)

workers = 2
preload_app = True
worker_class = "sync"
graceful_timeout = 10
