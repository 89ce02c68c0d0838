"""Where a SQL Lab request's time goes, stock Superset 6.1.0 against Superset with enginehouse.

bench_superset.py measures latency through gunicorn; this script says *why*: it serves the
same ``POST /api/v1/sqllab/execute/`` (``SELECT 1``) in-process through Flask's test client,
under cProfile, once per variant (stock; enginehouse SINGLETON), each in a child process of
``.venv/superset`` with the same metadata database, and reports per request the cumulative
time of the engine-related steps: ``Database.get_sqla_engine`` (Superset's steps plus
``create_engine``, or our hook), ``create_tunnel`` (SSH), the checkout and close of the
target connection (``get_raw_connection``), the DBAPI ``connect`` and the dialect's first
``initialize``, and the metadata-database work of the request for scale. Indented rows are
part of the row above them. cProfile inflates
Python-heavy steps alike for both variants; compare the rows, not the absolute times.

    python -m benchmarks.profile_superset              # direct and through SSH, 60 requests each
    python -m benchmarks.profile_superset --requests 200 --no-ssh
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any

from benchmarks.common import ROOT, machine_info, utc_now, write_results

sys.path.insert(0, str(ROOT / "tests"))
from sshd_fixtures import USER
from superset_e2e.bastion import start_bastion, stop_bastion
from superset_e2e.harness import (
    ADMIN_PASSWORD,
    ADMIN_USER,
    Variant,
    create_database,
    drop_database,
    superset_site,
)

VARIANTS = {"stock": Variant("stock"),
            "enginehouse": Variant("enginehouse-singleton", enginehouse_mode="singleton")}

STEPS = {
    "request (whole)": r"flask/app.py:\d+\(wsgi_app\)",
    "target connection: get_raw_connection": r"superset/models/core.py:\d+\(get_raw_connection\)",
    "  SSH: create_tunnel": r"(superset/extensions/ssh.py|integrations/superset/ssh.py)"
                            r":\d+\(create_tunnel\)",
    "  SSH: sshtunnel start + stop": r"sshtunnel.py:\d+\((start|stop)\)",
    "  _get_sqla_engine (Superset's steps + engine)": r"superset/models/core.py:\d+"
                                                      r"\(_get_sqla_engine\)",
    "    create_engine / our hook": r"(sqlalchemy/engine/create.py:\d+\(create_engine\)"
                                   r"|engine_hook.py:\d+\(__call__\))",
    "  DBAPI connect": r"psycopg2/__init__.py:\d+\(connect\)",
    "  dialect first initialize": r"sqlalchemy/engine/create.py:\d+\(first_connect\)",
    "every cursor.execute (metadata + target)": r"<method 'execute' of 'psycopg2.extensions"
                                                r".cursor' objects>",
}

CHILD = r'''
import cProfile, json, pstats, re, sys, time, uuid
from superset.app import create_app

args = json.loads(sys.argv[1])
app = create_app()
client = app.test_client()
login = client.post("/api/v1/security/login", json={
    "username": args["user"], "password": args["password"], "provider": "db", "refresh": True})
headers = {"Authorization": "Bearer " + login.get_json()["access_token"]}
csrf = client.get("/api/v1/security/csrf_token/", headers=headers)
headers["X-CSRFToken"] = csrf.get_json()["result"]
body = {"database_name": args["name"], "sqlalchemy_uri": args["uri"], "expose_in_sqllab": True}
if args.get("tunnel"):
    body["ssh_tunnel"] = args["tunnel"]
created = client.post("/api/v1/database/", headers=headers, json=body)
assert created.status_code == 201, created.data[:300]
database = created.get_json()["id"]

def query():
    answer = client.post("/api/v1/sqllab/execute/", headers=headers, json={
        "database_id": database, "sql": "SELECT 1 AS one", "runAsync": False,
        "client_id": uuid.uuid4().hex[:10], "sql_editor_id": "p", "tab": "p", "queryLimit": 10,
        "schema": None, "select_as_cta": False, "ctas_method": "TABLE", "templateParams": "",
        "expand_data": True})
    assert answer.status_code == 200, answer.data[:300]
    assert answer.get_json()["data"] == [{"one": 1}], answer.data[:300]

for _ in range(args["warmup"]):
    query()
profile = cProfile.Profile()
latencies = []
for _ in range(args["requests"]):
    started = time.perf_counter()
    profile.enable()
    query()
    profile.disable()
    latencies.append(time.perf_counter() - started)
stats = pstats.Stats(profile).stats
steps = {}
for label, pattern in args["steps"].items():
    regex = re.compile(pattern)
    total = 0.0
    for (path, line, name), (_cc, _nc, _tt, cumulative, _callers) in stats.items():
        if regex.search(f"{path}:{line}({name})"):
            total = max(total, cumulative) if label == "request (whole)" else total + cumulative
    steps[label] = 1000 * total / args["requests"]
calls = sum(nc for (path, _l, name), (_cc, nc, *_rest) in stats.items()
            if name == "<method 'execute' of 'psycopg2.extensions.cursor' objects>")
latencies.sort()
client.delete(f"/api/v1/database/{database}", headers=headers)
print(json.dumps({"steps_ms": steps, "executes_per_request": calls / args["requests"],
                  "p50_ms_profiled": 1000 * latencies[len(latencies) // 2]}))
'''


def child(site: Any, variant: Variant, case: str, uri: str, tunnel: dict[str, Any] | None,
          requests: int) -> dict[str, Any]:
    args = {"user": ADMIN_USER, "password": ADMIN_PASSWORD, "uri": uri, "tunnel": tunnel,
            "name": f"profile-{variant.name}-{case}", "requests": requests, "warmup": 5,
            "steps": STEPS}
    done = subprocess.run(
        [str(site.python), "-c", CHILD, json.dumps(args)], env=site.env(variant),
        cwd=site.workdir, capture_output=True, text=True, timeout=1800,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{variant.name} {case} failed:\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def run(requests: int, ssh: bool) -> dict[str, Any]:
    bastion = start_bastion() if ssh else None
    dbname = "profile_superset_target"
    uri = create_database(dbname)
    results: dict[str, Any] = {}
    try:
        with superset_site(VARIANTS["stock"], redis_db=12) as site:
            cases: dict[str, dict[str, Any] | None] = {"direct": None}
            if bastion is not None:
                cases["ssh"] = {"server_address": "127.0.0.1", "server_port": bastion.port,
                                "username": USER, "private_key": bastion.keys["rsa"]}
            for case, tunnel in cases.items():
                for name, variant in VARIANTS.items():
                    results[f"{name} {case}"] = child(site, variant, case, uri, tunnel, requests)
                    print(f"{name} {case} done", file=sys.stderr, flush=True)
    finally:
        drop_database(dbname)
        if bastion is not None:
            stop_bastion(bastion)
    return {"name": "profile_superset", "when": utc_now(), "machine": machine_info(),
            "requests": requests, "results": results}


def table(result: dict[str, Any]) -> str:
    cases = sorted({key.split()[1] for key in result["results"]}, key=("direct", "ssh").index)
    lines = []
    for case in cases:
        stock, ours = result["results"][f"stock {case}"], result["results"][f"enginehouse {case}"]
        lines += [f"\n{case}: ms per request under cProfile ({result['requests']} requests)",
                  "| step | stock | enginehouse |", "|---|---|---|"]
        for label in STEPS:
            lines.append(f"| {label} | {stock['steps_ms'][label]:.1f} | "
                         f"{ours['steps_ms'][label]:.1f} |")
        lines.append(f"| cursor.execute calls per request | {stock['executes_per_request']:.0f} | "
                     f"{ours['executes_per_request']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--no-ssh", action="store_true", help="direct only")
    args = parser.parse_args(argv)
    result = run(args.requests, not args.no_ssh)
    print(f"results: {write_results('profile_superset', result)}")
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
