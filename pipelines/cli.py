"""The ``hyperinf`` command line: demo, run, sql, ui.

Every command reads one YAML config (validated before any work) and one Dagster instance
(``--dagster-home``, else ``$DAGSTER_HOME``, else ``<config folder>/.dagster_home``), so runs made here
show up in ``hyperinf ui``. Problems with the input end in one ``hyperinf: error: ...`` line and exit 2;
runs that succeed with a failed asset check exit 1 after listing the checks.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

from hyperinf_ops.config_problems import did_you_mean
from hyperinf_ops.errors import HyperinfError

DEMO_WORKDIR = ".hyperinf_demo"
EXIT_CHECK_FAILED = 1  # every run succeeded, but an asset check did not pass (listed on stderr)
EXIT_ERROR = 2  # bad input or a failed run: one `hyperinf: error: ...` line
_QUIET_ENV = {
    "DAGSTER_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hyperinf`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers/peft deprecation chatter
    from pipelines.launcher import PipelineRunError

    try:
        return args.command(args)
    except (HyperinfError, PipelineRunError, FileNotFoundError) as err:
        print(f"hyperinf: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hyperinf",
        description="Influence-based data curation: LoRA gradients -> HyperINF scores -> SQL-curated subsets.",
        epilog="exit status: 0 done; 1 done, but an asset check failed (listed); 2 bad input or a failed run",
    )
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="build the bundled demo (MiniLM + Rotten Tomatoes) and run every asset")
    demo.add_argument("--n-pool", type=int, default=4000, help="pool examples (default 4000; 20%% flipped)")
    demo.add_argument("--n-target", type=int, default=500, help="clean target examples (default 500)")
    demo.add_argument("--evaluate", action="store_true",
                      help="also fit fresh adapters on curated, random and full subsets and test them (the "
                           "`evaluation` asset: 6 more warm-ups on 80%% of the pool)")
    demo.add_argument("--workdir", type=Path, default=Path(DEMO_WORKDIR),
                      help=f"where data, store and instance go (default {DEMO_WORKDIR})")
    _home_option(demo)
    demo.set_defaults(command=_demo)

    run = sub.add_parser("run", help="materialize every asset on your config")
    run.add_argument("--config", type=Path, required=True, help="the hyperinf YAML file")
    _home_option(run)
    run.set_defaults(command=_run)

    sql = sub.add_parser("sql", help="DuckDB SQL over the tables (examples, targets, scores, ...)")
    _config_option(sql)
    sql.add_argument("query", help="SQL text, or the name of a query in sql/ (then pass --param)")
    sql.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                     help="a named parameter of a sql/ query (repeatable)")
    sql.add_argument("--format", choices=("table", "csv", "json"), default="table")
    sql.set_defaults(command=_sql)

    ui = sub.add_parser("ui", help="start the Dagster UI (dagster dev) on 127.0.0.1 for this project")
    _config_option(ui)
    ui.add_argument("--port", type=int, default=3000)
    _home_option(ui)
    ui.set_defaults(command=_ui)
    return parser


def _home_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dagster-home", type=Path, default=None,
                   help="Dagster instance folder (default $DAGSTER_HOME, else <config folder>/.dagster_home)")


def _config_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None,
                   help=f"the hyperinf YAML file (default: the demo's, {DEMO_WORKDIR}/hyperinf.yaml)")


def _config_path(arg: Path | None) -> Path:
    path = arg or Path(DEMO_WORKDIR) / "hyperinf.yaml"
    if not path.is_file():
        hint = "" if arg else " (pass --config FILE, or run `hyperinf demo` first)"
        raise FileNotFoundError(f"config file {str(path)!r} does not exist{hint}")
    return path.resolve()


# ---------------------------------------------------------------------------------------------- demo / run

def _demo(args: argparse.Namespace) -> int:
    from hyperinf_ops.data.demo import DEMO_EVALUATION, build_demo_dataset, write_demo_config

    started = time.perf_counter()
    workdir = args.workdir.resolve()
    paths = build_demo_dataset(workdir, n_pool=args.n_pool, n_target=args.n_target)
    config = write_demo_config(paths, evaluation=DEMO_EVALUATION if args.evaluate else None)
    print(f"demo data: {paths.n_pool} Rotten Tomatoes snippets in {len(paths.shards)} shards "
          f"({paths.n_flipped} labels flipped), {paths.n_target} clean target examples; config {config}")
    status = _materialize(config, args.dagster_home)
    print(f"demo wall time: {time.perf_counter() - started:.0f} s")
    return status


def _run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    status = _materialize(_config_path(args.config), args.dagster_home)
    print(f"wall time: {time.perf_counter() - started:.0f} s")
    return status


def _materialize(config_path: Path, dagster_home: Path | None) -> int:
    from transformers.utils import logging as hf_logging

    from hyperinf_ops.config import load_config
    from pipelines.instance import dagster_home_for, open_instance
    from pipelines.runner import failed_checks, materialize_all
    from pipelines.summary import print_summary

    cfg = load_config(config_path)  # every config problem, before any work
    hf_logging.disable_progress_bar()  # no "Loading weights" bar at every model load
    home = dagster_home_for(config_path, dagster_home)
    print(f"Dagster instance: {home}")
    with open_instance(home) as instance:
        report = materialize_all(instance, config_path, cfg)
        print_summary(instance, cfg, config_path, home)
        failed = failed_checks(instance, report.runs)
    for line in failed:
        print(f"WARNING: asset check failed: {line}", file=sys.stderr)
    return EXIT_CHECK_FAILED if failed else 0


# ---------------------------------------------------------------------------------------------- sql

def _sql(args: argparse.Namespace) -> int:
    from hyperinf_ops.config import load_config
    from hyperinf_ops.query import connect, list_queries, run_query
    from hyperinf_ops.store import LanceStore

    cfg = load_config(_config_path(args.config))
    store = LanceStore(str(cfg.storage_root))
    versions = store.versions()
    if not versions:
        raise FileNotFoundError(f"no tables under {cfg.storage_root} yet: run `hyperinf run` (or demo) first")
    con = connect(store, versions=versions)
    try:
        queries = list_queries()
        if args.query in queries:
            params = dict(_parse_param(p) for p in args.param)
            if "scores" in versions:
                _check_scored(con, params)
            table = run_query(con, args.query, params)
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", args.query):  # a name, not SQL text
            raise HyperinfError(f"no query {args.query!r} in sql/{did_you_mean(args.query, queries)}; queries: "
                                f"{sorted(queries)} (or give SQL text, e.g. \"SELECT * FROM scores LIMIT 5\")")
        else:
            if args.param:
                raise HyperinfError("--param only applies to the named queries of sql/")
            table = _run_sql_text(con, args.query)
    finally:
        con.close()
    _print_table(table, args.format)
    return 0


def _check_scored(con, params: dict) -> None:
    """A `method` or target-set parameter naming nothing in `scores` would select nothing: say what exists."""
    from hyperinf_ops.config import TARGET_PARAMS

    pairs = con.sql("SELECT DISTINCT target_set, method FROM scores").fetchall()
    known = {"method": sorted({m for _, m in pairs}), "target set": sorted({t for t, _ in pairs})}
    for key, value in params.items():
        kind = "method" if key == "method" else "target set" if key in TARGET_PARAMS else None
        if kind and pairs and value not in known[kind]:
            raise HyperinfError(f"--param {key}={value}: no scores for {kind} {value!r}"
                                f"{did_you_mean(str(value), known[kind])}; scored: {known[kind]}")


def _run_sql_text(con, query: str):
    import duckdb

    try:
        rel = con.sql(query)
    except duckdb.Error as err:
        raise HyperinfError(f"SQL error: {str(err).splitlines()[0]}") from err
    if rel is None:
        raise HyperinfError("the statement returned no rows (hyperinf sql runs queries, e.g. SELECT ...)")
    return rel.to_arrow_table()


def _parse_param(text: str) -> tuple[str, object]:
    name, sep, raw = text.partition("=")
    if not sep or not name:
        raise HyperinfError(f"--param {text!r}: expected NAME=VALUE")
    try:
        value = json.loads(raw)  # numbers, true/false, null
    except json.JSONDecodeError:
        value = raw
    return name, value


def _print_table(table, fmt: str) -> None:
    import pandas as pd

    df = table.to_pandas()
    if fmt == "csv":
        sys.stdout.write(df.to_csv(index=False))
    elif fmt == "json":
        sys.stdout.write(df.to_json(orient="records", force_ascii=False, date_format="iso") + "\n")
    else:
        with pd.option_context("display.max_colwidth", 60, "display.width", 200, "display.max_rows", 200):
            print(df.to_string(index=False) if len(df) else "(no rows)")


# ---------------------------------------------------------------------------------------------- ui

def _ui(args: argparse.Namespace) -> int:
    from assets_defs.resources import CONFIG_ENV_VAR
    from hyperinf_ops.config import load_config
    from pipelines.devserver import start_dagster_dev, stop_dagster_dev, wait_until_ready
    from pipelines.instance import WORKSPACE_YAML, dagster_home_for, prepare_dagster_home

    config_path = _config_path(args.config)
    load_config(config_path)
    home = prepare_dagster_home(dagster_home_for(config_path, args.dagster_home))
    url = f"http://127.0.0.1:{args.port}"

    def _interrupt(signum, frame):  # Ctrl-C or `kill <pid>` of this process: stop dagster dev with it
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    print(f"starting dagster dev (instance {home}, config {config_path}) ...")
    proc = start_dagster_dev(dagster_home=home, workspace=WORKSPACE_YAML, port=args.port,
                             env={CONFIG_ENV_VAR: str(config_path)})
    try:
        wait_until_ready(proc, url)
        print(f"Dagster UI: {url}   (Ctrl-C stops it)")
        return proc.wait()
    except (RuntimeError, TimeoutError) as err:
        raise HyperinfError(str(err)) from err
    except KeyboardInterrupt:
        print("stopping dagster dev ...", file=sys.stderr)
        return 0
    finally:
        stop_dagster_dev(proc)


if __name__ == "__main__":
    sys.exit(main())
