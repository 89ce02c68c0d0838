"""gunicorn config for tests/test_gunicorn.py: the documented one-line hook import."""

from enginehouse.integrations.workers import post_fork, worker_exit  # noqa: F401  (gunicorn finds them by name)

workers = 2
preload_app = True
worker_class = "sync"
graceful_timeout = 10
