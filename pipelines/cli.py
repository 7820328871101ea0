"""The ``hyperinf`` command line: demo, run, migrate, sql, shell, plan, ui.

Every command reads one YAML config (validated before any work) and one Dagster instance
(``--dagster-home``, else ``$DAGSTER_HOME``, else ``<config folder>/.dagster_home``), so runs made here
show up in ``hyperinf ui``. Problems with the input end in one ``hyperinf: error: ...`` line and exit 2;
runs that succeed with a failed asset check exit 1 after listing the checks.

The top-level imports stay light and every command imports what it needs: ``sql`` and ``shell``
(`sql_commands.py`) answer in about a second because they never import torch, transformers or Dagster.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from hyperinf_ops.errors import HyperinfError

if TYPE_CHECKING:
    import dagster as dg

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
    warnings.filterwarnings("ignore", message=".* is currently in beta")  # Dagster's BetaWarning on import
    try:
        return args.command(args)
    except (HyperinfError, FileNotFoundError) as err:  # bad input, or a failed run (launcher.PipelineRunError)
        print(f"hyperinf: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # a bug: one line here, the trace in a file (or on the terminal with --verbose)
        if getattr(args, "verbose", False):
            raise
        print(f"hyperinf: error: unexpected {type(err).__name__}: {err} (full trace: {_write_trace()}; please "
              "report it)", file=sys.stderr)
        return EXIT_ERROR


def _write_trace() -> Path:
    """The current exception's trace in a new file under the temp folder; returns its path."""
    import tempfile
    import traceback

    fd, name = tempfile.mkstemp(prefix="hyperinf-error-", suffix=".log")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(traceback.format_exc())
    return Path(name)


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
    demo.add_argument("--llm", action="store_true",
                      help="the LLM demo instead: SmolLM2-135M-Instruct on a mixed pool of 2,038 prompt/response "
                           "pairs from 4 packaged sources, target task BBC News sections (data/instructions.py)")
    demo.add_argument("--evaluate", action="store_true",
                      help="also fit fresh adapters on curated, random and full subsets and test them (the "
                           "`evaluation` asset: 6 more warm-ups on 80%% of the pool; with --llm, 29 adapters: "
                           "curated and random 5%% for 4 epochs, the full pool, 3 seeds)")
    demo.add_argument("--workdir", type=Path, default=Path(DEMO_WORKDIR),
                      help=f"where data, store and instance go (default {DEMO_WORKDIR})")
    _home_option(demo)
    _verbose_option(demo)
    demo.set_defaults(command=_demo)

    run = sub.add_parser("run", help="materialize every asset on your config")
    run.add_argument("--config", type=Path, required=True, help="the hyperinf YAML file")
    _home_option(run)
    _verbose_option(run)
    run.set_defaults(command=_run)

    migrate = sub.add_parser("migrate", help="move the tables derived from gradient rows to <storage_root>/archive/ "
                                             "(after a change of lora.rank or row compression)")
    migrate.add_argument("--config", type=Path, required=True, help="the hyperinf YAML file")
    migrate.add_argument("--yes", action="store_true", help="do it (default: only list what would move)")
    migrate.set_defaults(command=_migrate)

    sql = sub.add_parser("sql", help="DuckDB SQL over the tables (examples, targets, scores, ...)")
    _config_option(sql)
    sql.add_argument("query", help="SQL text, or the name of a query in sql/ (then pass --param)")
    sql.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                     help="a named parameter of a sql/ query (repeatable)")
    sql.add_argument("--format", choices=("table", "csv", "json"), default="table")
    sql.add_argument("--live", action="store_true",
                     help="read the Lance tables even when the synced hyperinf.duckdb is current (default: the "
                          "file when current, it needs a third of the memory)")
    sql.set_defaults(command=_sql)

    shell = sub.add_parser("shell", help="interactive SQL prompt over the same tables (.help lists its commands)")
    _config_option(shell)
    shell.set_defaults(command=_shell)

    plan = sub.add_parser("plan", help="bytes, storage, time and memory of a run over N examples (runs nothing)")
    plan.add_argument("--config", type=Path, required=True, help="the hyperinf YAML file")
    plan.add_argument("--examples", type=int, required=True, help="pool examples to plan for")
    plan.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    plan.add_argument("--tokens", type=int, default=None,
                      help="average tokens per example of a model never measured, its times scaled by them "
                      "(default: max_length)")
    plan.set_defaults(command=_plan)

    ui = sub.add_parser("ui", help="start the Dagster UI (dagster dev) on 127.0.0.1 for this project")
    _config_option(ui)
    ui.add_argument("--port", type=int, default=3000)
    _home_option(ui)
    ui.set_defaults(command=_ui)
    return parser


def _home_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dagster-home", type=Path, default=None,
                   help="Dagster instance folder (default $DAGSTER_HOME, else <config folder>/.dagster_home)")


def _verbose_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", action="store_true",
                   help="print every Dagster event, stack traces included (default: the steps' progress lines; "
                        "a failure names the log file with its trace)")


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
    config = _llm_demo_data(workdir, args.evaluate) if args.llm else None
    if config is None:
        paths = build_demo_dataset(workdir, n_pool=args.n_pool, n_target=args.n_target)
        config = write_demo_config(paths, evaluation=DEMO_EVALUATION if args.evaluate else None)
        print(f"demo data: {paths.n_pool} Rotten Tomatoes snippets in {len(paths.shards)} shards "
              f"({paths.n_flipped} labels flipped), {paths.n_target} clean target examples; config {config}")
    status = _materialize(config, args.dagster_home, verbose=args.verbose)
    print(f"demo wall time: {time.perf_counter() - started:.0f} s")
    return status


def _llm_demo_data(workdir: Path, evaluate: bool) -> Path:
    """The LLM demo's data and config under `<workdir>/llm/` (hyperinf_ops/data/instructions.py)."""
    from hyperinf_ops.data.instructions import LLM_EVALUATION, build_instruction_mix, write_llm_config

    paths = build_instruction_mix(workdir / "llm")
    config = write_llm_config(paths, evaluation=LLM_EVALUATION if evaluate else None)
    print(f"LLM demo data: {paths.n_pool} prompt/response pairs from 4 sources in {len(paths.shards)} shards, "
          f"{paths.n_target} target pairs of BBC News sections, {paths.n_test} test pairs; config {config}")
    return config


def _run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    status = _materialize(_config_path(args.config), args.dagster_home, verbose=args.verbose)
    print(f"wall time: {time.perf_counter() - started:.0f} s")
    return status


def _materialize(config_path: Path, dagster_home: Path | None, *, verbose: bool) -> int:
    from transformers.utils import logging as hf_logging

    from hyperinf_ops.config import load_config
    from hyperinf_ops.stages.preflight import preflight
    from hyperinf_ops.store import LanceStore
    from hyperinf_ops.store.lease import hold_root
    from pipelines.instance import dagster_home_for, open_instance
    from pipelines.runner import failed_checks, materialize_all
    from pipelines.summary import print_summary

    cfg = load_config(config_path)  # every config problem, before any work
    # One run per storage root, held before the preflight reads the store, so what it finds stays true.
    with hold_root(cfg.storage_root, config_path) as lease:
        checked = preflight(LanceStore(str(cfg.storage_root)), cfg, log=_say)  # the data: before any write
        hf_logging.disable_progress_bar()  # no "Loading weights" bar at every model load
        home = dagster_home_for(config_path, dagster_home)
        print(f"Dagster instance: {home}")
        with open_instance(home) as instance:
            _fail_orphaned_runs(instance)
            report = materialize_all(instance, config_path, cfg, log=_say, verbose=verbose, checked=checked,
                                     lease=lease)
            print_summary(instance, cfg, config_path, home)
            failed = failed_checks(instance, report.runs)
    for line in failed:
        print(f"WARNING: asset check failed: {line}", file=sys.stderr)
    return EXIT_CHECK_FAILED if failed else 0


def _fail_orphaned_runs(instance: dg.DagsterInstance) -> None:
    """Free the run queue of runs left STARTED by a killed process (launcher.fail_orphaned_runs), one line each."""
    from pipelines.launcher import PID_TAG, fail_orphaned_runs

    for run in fail_orphaned_runs(instance):
        print(f"run {run.run_id} of {run.job_name} was left {run.status.value} by process {run.tags[PID_TAG]}, "
              "which is gone: marked failed", flush=True)


def _say(line: str) -> None:
    """The runner's lines: warnings to stderr as `hyperinf: warning: ...`, the rest to stdout."""
    if line.startswith("warning: "):
        print(f"hyperinf: {line}", file=sys.stderr)
    else:
        print(line, flush=True)


def _migrate(args: argparse.Namespace) -> int:
    """`hyperinf migrate`: hyperinf_ops/migrate.py (a rename into the archive; nothing is deleted)."""
    from hyperinf_ops.config import load_config
    from hyperinf_ops.migrate import migrate
    from hyperinf_ops.store.lease import hold_root

    config = _config_path(args.config)
    root = load_config(config).storage_root
    with hold_root(root, config):  # no run may write while its tables move
        summary = migrate(root, dry_run=not args.yes)
    if not summary.moved:
        print(f"nothing to migrate under {root}")
    elif args.yes:
        print(f"moved {', '.join(summary.moved)} to {summary.archive} (nothing deleted: move them back to undo); "
              f"`hyperinf run --config {args.config}` recomputes them")
    else:
        print(f"would move {', '.join(summary.moved)} to {root}/archive/<time>/ (a rename, reversible); rerun with "
              "--yes to do it")
    return 0


# ---------------------------------------------------------------------------------------------- sql / shell

def _sql(args: argparse.Namespace) -> int:
    """`hyperinf sql`: imported on use, so the command never loads the pipeline's heavy modules."""
    from pipelines.sql_commands import sql_command

    return sql_command(_config_path(args.config), args.query, args.param, args.format, live=args.live)


def _shell(args: argparse.Namespace) -> int:
    """`hyperinf shell`: the interactive prompt over the same sandboxed live tables as `hyperinf sql`."""
    from pipelines.sql_commands import shell_command

    return shell_command(_config_path(args.config))


def _plan(args: argparse.Namespace) -> int:
    """`hyperinf plan`: hyperinf_ops/capacity.py."""
    from hyperinf_ops.capacity import plan_command

    return plan_command(_config_path(args.config), args.examples, args.device, args.tokens)


# ---------------------------------------------------------------------------------------------- ui

def _ui(args: argparse.Namespace) -> int:
    from assets_defs.resources import CONFIG_ENV_VAR
    from hyperinf_ops.config import load_config
    from pipelines.devserver import start_dagster_dev, stop_dagster_dev, wait_until_ready
    from pipelines.instance import WORKSPACE_YAML, dagster_home_for, open_instance, prepare_dagster_home

    config_path = _config_path(args.config)
    load_config(config_path)
    _require_free_port(args.port)
    home = prepare_dagster_home(dagster_home_for(config_path, args.dagster_home))
    with open_instance(home) as instance:
        _fail_orphaned_runs(instance)  # else the daemon never starts a queued run (one at a time)
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


def _require_free_port(port: int) -> None:
    """HyperinfError unless `port` is a valid port free on 127.0.0.1 (else dagster dev fails after a minute)."""
    import socket

    if not 1 <= port <= 65535:
        raise HyperinfError(f"--port {port}: a port is a number from 1 to 65535")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as err:
            raise HyperinfError(f"--port {port}: cannot listen on 127.0.0.1:{port} ({err.strerror}); is another "
                                "`hyperinf ui` running? pick another port with --port") from err


if __name__ == "__main__":
    sys.exit(main())
