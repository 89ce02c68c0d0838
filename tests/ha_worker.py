"""A worker process for the fleet failover tests: ``python tests/ha_worker.py CONFIG_JSON``.

``threads`` threads run ``sql`` through ``EngineManager.connect`` for ``seconds``;
the worker prints ``READY`` after its first query, then one JSON line: queries
done, their end times (CLOCK_MONOTONIC, the same clock in every process of the
machine), and each failure's class, whether it is an ``EngineManagerError``, and when.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import text

from enginehouse import DatabaseSpec, EngineManager
from enginehouse.errors import EngineManagerError


def main(config: dict[str, Any]) -> None:
    spec = DatabaseSpec(**config["spec"])
    sql = text(config["sql"])
    done: list[float] = []
    errors: list[tuple[str, bool, float]] = []
    ready = threading.Event()
    with EngineManager(**config["settings"]) as manager:
        end = time.monotonic() + config["seconds"]

        def run() -> None:
            while time.monotonic() < end:
                try:
                    with manager.connect(spec) as connection:
                        connection.execute(sql)
                    done.append(time.monotonic())
                    if not ready.is_set():
                        ready.set()
                        print("READY", flush=True)
                except Exception as exc:  # what reaches a caller is what the test checks
                    ours = isinstance(exc, EngineManagerError)
                    errors.append((type(exc).__name__, ours, time.monotonic()))
                    time.sleep(0.02)

        threads = [threading.Thread(target=run) for _ in range(config["threads"])]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        budgets = [b.model_dump() for b in manager.stats().budgets]
    print(json.dumps({"done": done, "errors": errors, "budgets": budgets}), flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
