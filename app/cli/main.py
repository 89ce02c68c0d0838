"""The ``enginehouse`` command (also ``python -m enginehouse``): demo, check, stats, bench.

Exit codes are documented in docs/cli.md; every failure prints one clear
line on stderr and never a secret.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from enginehouse import __version__
from enginehouse.cli.check import ExitCode, Report, check_file

BENCHMARKS_DIR = Path(__file__).resolve().parents[2] / "benchmarks"
"""Where ``bench`` finds ``bench_*.py``; the ENGINEHOUSE_BENCHMARKS_DIR variable overrides it."""

EPILOG = """exit codes: 0 ok, 1 internal error, 2 bad input (usage, spec, URL), 3 driver missing,
4 SSH tunnel, 5 connect/auth (stats: endpoint unreachable), 6 query (stats: not an
enginehouse metrics page), 7 engine creation refused; bench: the failing benchmark's code."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["demo"]:
        return _demo(arguments[1:])  # the demo parses (and documents) its own options
    parser = _parser()
    args = parser.parse_args(arguments)
    if args.command is None:
        parser.print_help(sys.stderr)
        return int(ExitCode.BAD_INPUT)
    try:
        with _lifecycle_logs(args.verbose):
            code: int = args.run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return code


@contextmanager
def _lifecycle_logs(verbosity: int) -> Iterator[None]:
    """``-v``: enginehouse's lifecycle logs (INFO) on stderr; ``-vv``: DEBUG. Masked as always."""
    if not verbosity:
        yield
        return
    logger = logging.getLogger("enginehouse")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    previous = logger.level
    logger.setLevel(logging.DEBUG if verbosity > 1 else logging.INFO)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="enginehouse",
        description="SQLAlchemy engines, pools and SSH tunnels: demo, checks and diagnostics.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="show lifecycle logs on stderr (-vv: debug)",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser(
        "demo", help="run the embedded SQLite demo (see: enginehouse demo --help)", add_help=False
    )
    demo.set_defaults(run=lambda args: _demo([]))

    check = commands.add_parser(
        "check",
        help="test a database spec: validate, tunnel, connect, SELECT 1, with timings",
        description="Validate SPEC.json (DatabaseSpec fields: id, uri, password, extra, "
        "impersonate_user, ssh_tunnel), open its SSH tunnel if any, connect and run "
        "SELECT 1, timing each step. The exit code names the first failing step.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("spec", metavar="SPEC.json", help="a JSON file with one database spec")
    check.add_argument("--timeout", type=_positive, default=10.0, help="seconds per step")
    check.add_argument("--catalog", help="connect to this catalog")
    check.add_argument("--schema", help="connect with this schema")
    check.add_argument("--user", help="impersonate this user (when the spec allows it)")
    check.add_argument("--query", help="SQL to run instead of SELECT 1")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.set_defaults(run=_check)

    stats = commands.add_parser(
        "stats",
        help="summarise a running process's /metrics endpoint",
        description="Fetch a Prometheus page served by "
        "enginehouse.integrations.metrics.start_metrics_server "
        "and print engines, pools, actors, tunnels and budgets.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    stats.add_argument("url", help="http://HOST:PORT or http://HOST:PORT/metrics")
    stats.add_argument("--timeout", type=_positive, default=10.0, help="seconds to wait")
    stats.add_argument("--json", action="store_true", help="print the samples as JSON")
    stats.set_defaults(run=_stats)

    bench = commands.add_parser(
        "bench",
        help="rerun the benchmarks (quick by default)",
        description="Run python -m benchmarks.<NAME> for each benchmark module, in turn.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument("names", nargs="*", metavar="NAME", help="e.g. bench_core (default: all)")
    bench.add_argument("--full", action="store_true", help="full runs instead of --quick")
    bench.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    bench.set_defaults(run=_bench)
    return parser


def _positive(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return number


# -- demo ---------------------------------------------------------------------


def _demo(arguments: list[str]) -> int:
    try:
        from enginehouse.cli.demo import run_demo
    except ImportError as exc:
        print(f"demo unavailable: {exc}", file=sys.stderr)
        return int(ExitCode.INTERNAL)
    try:
        return int(run_demo(arguments))
    except SystemExit as exit_:  # the demo's own argparse (--help, bad option)
        return exit_.code if isinstance(exit_.code, int) else int(ExitCode.BAD_INPUT)


# -- check --------------------------------------------------------------------


def _check(args: argparse.Namespace) -> int:
    report = check_file(
        args.spec,
        timeout=args.timeout,
        catalog=args.catalog,
        schema=args.schema,
        user=args.user,
        query=args.query,
    )
    if args.json:
        print(json.dumps(report.as_dict(), indent=2, default=str))
    else:
        _print_report(report)
    if not report.ok:
        failed = next((s for s in report.steps if s.status == "failed"), None)
        where = f"{failed.name}: {failed.detail}" if failed else "unknown step"
        print(
            f"check failed ({report.code.name.lower()}, exit {int(report.code)}): {where}",
            file=sys.stderr,
        )
    return int(report.code)


def _print_report(report: Report) -> None:
    print(f"checking {report.source}")
    for step in report.steps:
        took = f"{step.seconds * 1000:9.1f} ms" if step.seconds is not None else " " * 12
        print(f"  {step.name:<8} {step.status:<7} {took}  {step.detail}")
    total = sum(step.seconds or 0 for step in report.steps)
    if report.ok:
        print(f"OK: database {report.database_id} answered in {total * 1000:.1f} ms in total")


# -- stats --------------------------------------------------------------------

Samples = list[tuple[str, dict[str, str], float]]


def _stats(args: argparse.Namespace) -> int:
    url = _metrics_url(args.url)
    if url is None:
        print(f"stats: not an http(s) URL: {args.url!r}", file=sys.stderr)
        return int(ExitCode.BAD_INPUT)
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as response:
            body = response.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"stats: cannot fetch {url}: {reason}", file=sys.stderr)
        return int(ExitCode.CONNECT)
    try:
        samples = _parse(body)
    except ValueError as exc:
        print(f"stats: {url} is not a Prometheus text page: {exc}", file=sys.stderr)
        return int(ExitCode.QUERY)
    if not any(name.startswith("enginehouse_") for name, _, _ in samples):
        print(f"stats: {url} has no enginehouse_* metrics", file=sys.stderr)
        return int(ExitCode.QUERY)
    if args.json:
        rows = [{"name": n, "labels": lab, "value": v} for n, lab, v in samples]
        print(json.dumps(rows, indent=2))
    else:
        print("\n".join(summarise(samples, url)))
    return int(ExitCode.OK)


def _metrics_url(text: str) -> str | None:
    parts = urllib.parse.urlsplit(text if "://" in text else f"http://{text}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    path = parts.path if parts.path not in ("", "/") else "/metrics"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def _parse(body: str) -> Samples:
    from prometheus_client.parser import text_string_to_metric_families

    return [
        (sample.name, dict(sample.labels), float(sample.value))
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    ]


def summarise(samples: Samples, url: str) -> list[str]:
    """A readable summary of an enginehouse metrics page."""
    value = _lookup(samples)
    up = value("enginehouse_up")
    lines = [f"enginehouse at {url}: {'up' if up == 1 else 'DOWN (stats() failed)'}"]
    lines.append(
        "engines: {:g} cached; created {:g}, uncached {:g}, evicted {:g}, disposed {:g}; "
        "cache hits {:g}, misses {:g}".format(
            sum(v for n, _, v in samples if n == "enginehouse_engines"),
            value("enginehouse_engine_creations_total"),
            value("enginehouse_engine_uncached_creations_total"),
            value("enginehouse_engine_evictions_total"),
            value("enginehouse_engine_disposals_total"),
            value("enginehouse_cache_hits_total"),
            value("enginehouse_cache_misses_total"),
        )
    )
    lines += _pool_table(samples)
    actors = _by_label(samples, "enginehouse_actor_up", "actor")
    restarts = _by_label(samples, "enginehouse_actor_restarts_total", "actor")
    if actors:
        lines.append(
            "actors: "
            + ", ".join(
                f"{name} {'up' if up == 1 else 'DOWN'} ({restarts.get(name, 0):g} restarts)"
                for name, up in sorted(actors.items())
            )
        )
    tunnels = _by_label(samples, "enginehouse_tunnel_up", "bastion")
    if tunnels:
        tunnel_restarts = _by_label(samples, "enginehouse_tunnel_restarts_total", "bastion")
        forwards = _by_label(samples, "enginehouse_tunnel_forwards", "bastion")
        lines.append("tunnels:")
        for bastion, up in sorted(tunnels.items()):
            lines.append(
                f"  {bastion}: {'connected' if up == 1 else 'not connected'}, "
                f"{forwards.get(bastion, 0):g} forwards, "
                f"{tunnel_restarts.get(bastion, 0):g} restarts"
            )
    budgets = _by_label(samples, "enginehouse_budget_cap", "budget")
    if budgets:
        held = _by_label(samples, "enginehouse_budget_held", "budget")
        waiting = _by_label(samples, "enginehouse_budget_waiting", "budget")
        fleet = _by_label(samples, "enginehouse_budget_fleet_held", "budget")
        timeouts = _by_label(samples, "enginehouse_budget_timeouts_total", "budget")
        lines.append("budgets:")
        for key, cap in sorted(budgets.items()):
            everywhere = f", {fleet[key]:g} fleet-wide" if key in fleet else ""
            lines.append(
                f"  {key}: {held.get(key, 0):g}/{cap:g} held here{everywhere}, "
                f"{waiting.get(key, 0):g} waiting, {timeouts.get(key, 0):g} timeouts"
            )
    return lines


def _pool_table(samples: Samples) -> list[str]:
    columns = {
        "engines": "enginehouse_engines",
        "size": "enginehouse_pool_size",
        "in use": "enginehouse_pool_checked_out",
        "idle": "enginehouse_pool_checked_in",
        "overflow": "enginehouse_pool_overflow",
        "pending": "enginehouse_pool_pending",
        "timeouts": "enginehouse_pool_timeouts_total",
    }
    table = {title: _by_label(samples, name, "database") for title, name in columns.items()}
    waits = _by_label(samples, "enginehouse_pool_wait_seconds_count", "database")
    wait_sum = _by_label(samples, "enginehouse_pool_wait_seconds_sum", "database")
    databases = sorted(set().union(*table.values(), waits), key=_natural)
    if not databases:
        return ["pools: none"]
    header = "  {:<12}".format("database") + "".join(f"{t:>10}" for t in columns)
    lines = ["pools:", header + f"{'checkouts':>11}{'mean wait':>12}"]
    for database in databases:
        cells = "".join(
            f"{table[t][database]:>10g}" if database in table[t] else f"{'-':>10}" for t in columns
        )
        count = waits.get(database, 0)
        mean = f"{wait_sum.get(database, 0) / count * 1000:.2f} ms" if count else "-"
        lines.append(f"  {database:<12}{cells}{count:>11g}{mean:>12}")
    return lines


def _lookup(samples: Samples) -> Any:
    plain = {name: v for name, labels, v in samples if not labels}

    def value(name: str) -> float:
        return plain.get(name, 0.0)

    return value


def _by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    return {labels[label]: v for n, labels, v in samples if n == name and label in labels}


def _natural(text: str) -> tuple[int, int | str]:
    return (0, int(text)) if text.isdigit() else (1, text)


# -- bench --------------------------------------------------------------------


def _bench(args: argparse.Namespace) -> int:
    folder = Path(os.environ.get("ENGINEHOUSE_BENCHMARKS_DIR") or BENCHMARKS_DIR)
    available = sorted(p.stem for p in folder.glob("bench_*.py"))
    if not available:
        print(
            f"bench: no benchmarks found in {folder} (run from a source checkout)",
            file=sys.stderr,
        )
        return int(ExitCode.BAD_INPUT)
    if args.list:
        print("\n".join(available))
        return 0
    unknown = [name for name in args.names if name not in available]
    if unknown:
        print(
            f"bench: unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(available)}",
            file=sys.stderr,
        )
        return int(ExitCode.BAD_INPUT)
    for name in args.names or available:
        command = [sys.executable, "-m", f"benchmarks.{name}"]
        if not args.full:
            command.append("--quick")
        print(f"$ {' '.join(command[1:])}", flush=True)
        code = subprocess.run(command, cwd=folder.parent, check=False).returncode
        if code != 0:
            print(f"bench: {name} failed with exit code {code}", file=sys.stderr)
            return code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
