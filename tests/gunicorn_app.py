"""WSGI app for tests/test_gunicorn.py, served by a real gunicorn with --preload.

The master imports this module, starts the Flask extension's manager and
opens a pooled PostgreSQL connection before it forks its workers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from conftest import PG_URI
from flask import Flask, jsonify
from sqlalchemy import text

from enginehouse import DatabaseSpec
from enginehouse.integrations import workers
from enginehouse.integrations.flask import EngineManagerExtension

PG = PG_URI
SPEC = DatabaseSpec(id=801, uri=PG, extra={"engine_params": {"pool_size": 1}})

app = Flask("enginehouse-gunicorn-test")
extension = EngineManagerExtension(app)

with app.app_context(), extension.manager.connect(SPEC) as connection:
    MASTER_BACKEND = connection.execute(text("select pg_backend_pid()")).scalar_one()
Path(os.environ["ENGINEHOUSE_TEST_GUNICORN_STATE"]).write_text(
    json.dumps({"pid": os.getpid(), "backend": MASTER_BACKEND})
)


@app.get("/backend")
def backend() -> Any:
    with extension.manager.connect(SPEC) as connection:
        pid = connection.execute(text("select pg_backend_pid()")).scalar_one()
        connection.execute(text("select pg_sleep(0.3)"))  # keep this worker busy a moment
    return jsonify(pid=os.getpid(), backend=pid, reset_pid=workers.last_reset.pid)
