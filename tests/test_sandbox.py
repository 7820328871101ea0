"""User SQL in the sandbox, `hyperinf sql` without the heavy stack, and `hyperinf shell` on a real terminal.

Every escape route (reading a file, COPY TO, ATTACH, INSTALL / LOAD, writes to the tables) through
`hyperinf sql` ends in exit 2 and one `hyperinf: error:` line, with no file created and every Lance table
at the same version and row count; a `where:` target predicate that reads a file fails the same way.
"""

from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pytest
import yaml

from hyperinf_ops.config import load_config
from hyperinf_ops.data.prepare import prepare_examples, prepare_targets
from hyperinf_ops.errors import DataError
from hyperinf_ops.query import DUCKDB_FILE, connect, open_snapshot, sync_duckdb
from hyperinf_ops.store import LanceStore, scores_schema
from pipelines.cli import main
from pipelines.sql_commands import open_tables, run_shell

N = 30
HYPERINF = Path(sys.executable).parent / "hyperinf"  # the console script, as a user runs it


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A config whose store holds `examples` (N rows, labels pos/neg) and `scores` (one method); the config."""
    root = tmp_path_factory.mktemp("sandbox")
    pool = pd.DataFrame({"id": [f"p{i:02d}" for i in range(N)], "text": [f"text {i}" for i in range(N)],
                         "label": ["pos", "neg"] * (N // 2)})
    pool.to_parquet(root / "pool.parquet")
    config = root / "hyperinf.yaml"
    config.write_text(yaml.safe_dump({
        "storage_root": "store",
        "data": {"path": "pool.parquet", "text_column": "text", "label_column": "label", "id_column": "id"},
        "targets": {"positive": {"where": "label = 'pos'"}},
    }))
    cfg = load_config(config)
    store = LanceStore(str(cfg.storage_root))
    store.write_examples("pool", prepare_examples(pool, cfg.data, cfg.task, "pool"))
    scores = pa.table({"sample_id": pool["id"], "target_set": ["positive"] * N, "method": ["tracin"] * N,
                       "score": [float(i) for i in range(N)], "rank": list(range(N, 0, -1)),
                       "percentile": [i / N for i in range(N)], "fingerprint": ["-"] * N,
                       "gradients_version": [1] * N, "run_id": ["r"] * N,
                       "created_at": pa.array([0] * N, pa.timestamp("us", tz="UTC"))}, schema=scores_schema())
    store.replace_where("scores", {"target_set": "positive", "method": "tracin"}, scores, schema=scores_schema())
    return config


def _tables(config: Path) -> dict[str, tuple[int, int]]:
    """table -> (Lance version, row count): what no user SQL may change."""
    store = LanceStore(str(load_config(config).storage_root))
    return {table: (version, store.open(table).count_rows()) for table, version in store.versions().items()}


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "Traceback" not in captured.err, captured
    assert captured.err.startswith("hyperinf: error: "), captured.err
    return captured.err.strip()


REFUSED = ("SQL here only reads (SELECT, WITH, FROM, SHOW, DESCRIBE, SUMMARIZE, EXPLAIN); the tables are "
           "read-only")


@pytest.mark.parametrize("sql", [
    "SELECT * FROM read_text('{secret}')",
    "SELECT * FROM read_csv('{secret}')",
    "SELECT count(*) FROM glob('{folder}/*')",
])
def test_sql_cannot_read_files(project, capsys, sql):
    secret = project.parent / "secret.txt"
    secret.write_text("a,b\n1,2\n")
    assert main(["sql", "--config", str(project), sql.format(secret=secret, folder=project.parent)]) == 2
    error = _one_error_line(capsys)
    assert error.startswith("hyperinf: error: SQL error: Permission Error: Cannot access file") and \
        error.endswith("file system operations are disabled by configuration"), error


@pytest.mark.parametrize(("sql", "keyword", "creates"), [
    ("COPY examples TO '{folder}/out.csv'", "COPY", "out.csv"),
    ("SELECT 1; COPY (SELECT * FROM scores) TO '{folder}/out.parquet'", "COPY", "out.parquet"),
    ("EXPORT DATABASE '{folder}/exported'", "EXPORT", "exported"),
    ("ATTACH '{folder}/other.duckdb' AS other", "ATTACH", "other.duckdb"),
    ("INSTALL httpfs", "INSTALL", None),
    ("LOAD httpfs", "LOAD", None),
    ("INSERT INTO scores SELECT * FROM scores", "INSERT", None),
    ("DELETE FROM examples", "DELETE", None),
    ("UPDATE scores SET score = 0", "UPDATE", None),
    ("DROP VIEW scores", "DROP", None),
    ("CREATE TABLE examples2 AS SELECT * FROM examples", "CREATE", None),
    ("SET enable_external_access = true", "SET", None),
])
def test_sql_refuses_everything_but_queries(project, capsys, sql, keyword, creates):
    before = _tables(project)
    assert main(["sql", "--config", str(project), sql.format(folder=project.parent)]) == 2
    assert _one_error_line(capsys) == f"hyperinf: error: SQL error: {keyword} is refused: {REFUSED}"
    assert creates is None or not (project.parent / creates).exists()
    assert _tables(project) == before


def test_the_connection_itself_is_sandboxed(project, tmp_path):
    """Beneath the statement check: DuckDB refuses files, databases and extensions on the live connection,
    and the setting cannot be turned back on."""
    con = connect(LanceStore(str(load_config(project).storage_root)))
    for statement, message in [
        (f"COPY examples TO '{tmp_path}/x.csv'", "file system operations are disabled by configuration"),
        (f"ATTACH '{tmp_path}/x.duckdb'", "file system operations are disabled by configuration"),
        ("INSTALL httpfs", "file system operations are disabled by configuration"),
        ("LOAD httpfs", "Loading external extensions is disabled through configuration"),
        ("SET enable_external_access = true", "the configuration has been locked"),
        ("RESET lock_configuration", "the configuration has been locked"),
    ]:
        with pytest.raises(duckdb.Error, match=re.escape(message)):
            con.execute(statement)
    assert list(tmp_path.iterdir()) == []
    assert con.sql("SELECT count(*) FROM examples").fetchall() == [(N,)]
    con.close()


def test_where_predicate_cannot_read_files(project, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("x")
    cfg = load_config(project)
    targets = load_config({**yaml.safe_load(project.read_text()), "targets": {
        "sneaky": {"where": f"(SELECT count(*) FROM read_text('{secret}')) > 0"}}}, base_dir=project.parent).targets
    pool = LanceStore(str(cfg.storage_root)).open("examples").to_table()
    with pytest.raises(DataError) as err:  # the config parses: the sandbox is what stops it
        prepare_targets(targets, cfg.data, cfg.task, pool)
    message = str(err.value)
    assert "\n" not in message and message.startswith("target set 'sneaky': `where: (SELECT count(*) FROM read_text(")
    assert f'Permission Error: Cannot access file "{secret}" - file system operations are disabled' in message
    assert len(prepare_targets(cfg.targets, cfg.data, cfg.task, pool)["positive"]) == N // 2  # reads still work


def test_sql_imports_neither_torch_nor_transformers_nor_dagster(project):
    """`hyperinf sql` and `hyperinf shell` in a fresh interpreter: the right rows, and no heavy import."""
    script = (
        "import io, json, sys, contextlib\n"
        "from pipelines.cli import main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        f"    sql = main(['sql', '--config', {str(project)!r}, 'SELECT count(*) AS n FROM examples', "
        "'--format', 'json'])\n"
        f"    shell = main(['shell', '--config', {str(project)!r}])\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'dagster', 'peft') if m in sys.modules)\n"
        "print(json.dumps([sql, shell, out.getvalue(), heavy]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], input="SELECT 7 AS seven;\n", capture_output=True,
                          text=True, timeout=120, cwd=Path(__file__).parents[1])
    sql, shell, out, heavy = json.loads(done.stdout.splitlines()[-1])
    assert (sql, shell, heavy) == (0, 0, []), done.stderr[-2000:]
    assert out.splitlines()[0] == f'[{{"n":{N}}}]' and out.split()[1:3] == ["seven", "7"], out


def test_synced_file_is_readable_by_duckdb_1x(project):
    """The synced file is written in a DuckDB 1.x storage format, and a later sync replaces it whole."""
    store = LanceStore(str(load_config(project).storage_root))
    for _ in range(2):
        versions = sync_duckdb(store)
        with duckdb.connect(f"{store.root}/{DUCKDB_FILE}", read_only=True) as db:
            tags = db.sql("SELECT tags FROM duckdb_databases() WHERE NOT internal AND database_name != 'memory'"
                          ).fetchall()
            assert tags == [({"storage_version": "v1.0.0+"},)]
            assert dict(db.sql("SELECT table_name, version FROM _lance_versions").fetchall()) == versions
            assert db.sql("SELECT count(*) FROM examples").fetchall() == [(N,)]
    assert sorted(p.name for p in Path(store.root).iterdir() if p.is_file()) == [DUCKDB_FILE]  # no temp files


class Terminal:
    """A process on a pseudo-terminal: type lines, read what the screen shows."""

    def __init__(self, argv: list[str]) -> None:
        self.fd, child = pty.openpty()
        self.proc = subprocess.Popen(argv, stdin=child, stdout=child, stderr=child, start_new_session=True,
                                     env={**os.environ, "TERM": "dumb"})
        os.close(child)
        self.screen = ""

    def type(self, line: str) -> None:
        os.write(self.fd, (line + "\n").encode())

    def read_until(self, pattern: str, timeout: float = 60) -> str:
        """Everything shown since the last match, up to and including `pattern` (a regex)."""
        deadline = time.monotonic() + timeout
        while not (match := re.search(pattern, self.screen)):
            ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"no {pattern!r} within {timeout} s; screen:\n{self.screen[-2000:]}")
            try:
                self.screen += os.read(self.fd, 4096).decode(errors="replace").replace("\r\n", "\n")
            except OSError:  # the process exited and closed the terminal
                raise AssertionError(f"exited before {pattern!r}; screen:\n{self.screen[-2000:]}") from None
        shown, self.screen = self.screen[:match.end()], self.screen[match.end():]
        return shown

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.fd)


def test_shell_on_a_terminal(project):
    """`hyperinf shell` as a person uses it: type queries at the prompt, read the answers, leave with .quit."""
    store = LanceStore(str(load_config(project).storage_root))
    before = _tables(project)
    term = Terminal([str(HYPERINF), "shell", "--config", str(project)])
    try:
        assert "live read-only views of 2 tables (examples, scores)" in term.read_until(r"hyperinf> ")
        term.type("SELECT count(*) AS n FROM examples;")
        answer = term.read_until(r"hyperinf> ")
        assert re.search(r"^\s*n\n\s*(\d+)\n", answer.split("\n", 1)[1], re.M)[1] == str(store.open("examples")
                                                                                            .count_rows())
        term.type("SELECT label, count(*) AS n, 'a;b' AS s")  # one statement over three lines
        term.read_until(r"\.\.\.> ")  # a ';' inside a string ends nothing: the continuation prompt
        term.type("FROM examples")
        term.read_until(r"\.\.\.> ")
        term.type("GROUP BY label ORDER BY label;")
        assert re.search(rf"label\s+n\s+s\n\s*neg\s+{N // 2}\s+a;b\n\s*pos\s+{N // 2}\s+a;b\n",
                         term.read_until(r"hyperinf> "))
        term.type(f"COPY examples TO '{project.parent}/leak.csv';")
        shown = term.read_until(r"hyperinf> ").split("\n")[1:-1]
        assert shown == [f"SQL error: COPY is refused: {REFUSED}"], shown
        term.type("SELECT * FROM nowhere;")
        assert "SQL error: Catalog Error: Table with name nowhere does not exist!" in term.read_until(r"hyperinf> ")
        term.type(".tables")
        assert re.search(rf"examples\s+{N}\s+\d+\n\s*scores\s+{N}\s+\d+", term.read_until(r"hyperinf> "))
        term.type(".schema scores")
        assert re.search(r"score\s+DOUBLE", term.read_until(r"hyperinf> "))
        term.type(".quit")
        assert term.proc.wait(timeout=30) == 0
    finally:
        term.close()
    assert not (project.parent / "leak.csv").exists() and _tables(project) == before


def _sql_in_a_fresh_interpreter(config: Path, *flags: str) -> tuple[str, bool]:
    """(`hyperinf sql` JSON output of a label count, whether it imported lance), in a new interpreter."""
    script = (
        "import io, json, sys, contextlib\n"
        "from pipelines.cli import main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        f"    status = main(['sql', '--config', {str(config)!r}, *{list(flags)!r}, '--format', 'json', "
        "\"SELECT label, count(*) AS n FROM examples WHERE label = 'pos' GROUP BY label\"])\n"
        "print(json.dumps([status, out.getvalue(), 'lance' in sys.modules]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parents[1])
    status, out, lance_imported = json.loads(done.stdout.splitlines()[-1])
    assert status == 0, done.stderr[-2000:]
    return out, lance_imported


def test_sql_reads_the_synced_file_while_it_is_current(project):
    """`hyperinf sql` answers from hyperinf.duckdb (no Lance import) while it holds every table's latest
    version; a commit to any table makes it read the live tables, with the same rows, until the next sync."""
    store = LanceStore(str(load_config(project).storage_root))
    sync_duckdb(store)
    snapshot = open_snapshot(store.root)
    assert snapshot is not None and snapshot[1] == store.versions()
    snapshot[0].close()
    expected = f'[{{"label":"pos","n":{N // 2}}}]\n'  # a WHERE on a text column: pushed down on live reads
    assert _sql_in_a_fresh_interpreter(project) == (expected, False)
    assert _sql_in_a_fresh_interpreter(project, "--live") == (expected, True)

    extra = pd.DataFrame({"id": ["x1"], "text": ["one more"], "label": ["pos"]})
    cfg = load_config(project)
    store.write_examples("extra", prepare_examples(extra, cfg.data, cfg.task, "extra"))
    assert open_snapshot(store.root) is None  # stale: read live, which sees the new row
    assert _sql_in_a_fresh_interpreter(project) == (f'[{{"label":"pos","n":{N // 2 + 1}}}]\n', True)
    store.write_examples("extra", pa.Table.from_pylist([], schema=store.open("examples").schema))
    sync_duckdb(store)
    assert _sql_in_a_fresh_interpreter(project) == (expected, False)


def test_a_table_folder_moved_back_with_old_times_makes_the_synced_file_stale(project):
    """The undo of `hyperinf migrate` moves archived table folders back: their manifests are other files with
    old modification times, so a freshness test by mtime called the synced copy current and `hyperinf sql`
    answered from the replaced tables (issue 19, route 2). The copy records its manifests: any other set is
    stale, and plain `sql` then reads what `--live` reads."""
    store = LanceStore(str(load_config(project).storage_root))
    sync_duckdb(store)
    examples = Path(store.uri("examples"))
    archived = examples.with_name("archived.lance")
    shutil.copytree(examples, archived)  # the restored table: the same rows under other manifest files ...
    cfg = load_config(project)
    store.write_examples("extra", prepare_examples(pd.DataFrame({"id": ["x1"], "text": ["one more"], "label": ["pos"]}),
                                                   cfg.data, cfg.task, "extra"))
    sync_duckdb(store)  # ... while the live table has moved on and been synced
    shutil.rmtree(examples)
    archived.rename(examples)
    old = time.time() - 86_400
    for path in [examples, *examples.rglob("*")]:
        os.utime(path, (old, old))  # ... and every time older than the sync
    assert open_snapshot(store.root) is None
    expected = f'[{{"label":"pos","n":{N // 2}}}]\n'  # the restored table's rows, not the synced copy's
    assert _sql_in_a_fresh_interpreter(project) == (expected, True)
    assert _sql_in_a_fresh_interpreter(project, "--live") == (expected, True)


@pytest.mark.parametrize(("args", "message"), [
    (["mislabel_candidates", "--param", "target_set=positive", "--param", "method=tracin", "--param", "n=null"],
     "--param n=null: input should be a valid integer, got None"),
    (["top_fraction", "--param", "target_set=positive", "--param", "method=tracin", "--param", "fraction=2",
      "--param", "balance=false"], "--param fraction=2: input should be less than or equal to 1, got 2"),
    (["../../x"], "no query '../../x' in sql/"),
    (["EXPLAIN ANALYZE CREATE TABLE x AS SELECT 1"], "SQL error: CREATE is refused: SQL here only reads"),
])
def test_sql_parameters_and_names_are_checked_before_they_run(project, capsys, args, message):
    """Audit routes (issue 19): a named query's parameters are checked like the config's (`n=null` returned every
    row), a path is named as a query that does not exist, EXPLAIN ANALYZE may not run what it explains."""
    assert main(["sql", "--config", str(project), *args]) == 2
    assert capsys.readouterr().err.startswith(f"hyperinf: error: {message}")


def test_dollar_quoted_text_and_a_shell_statement_without_its_semicolon(project, capsys):
    assert main(["sql", "--config", str(project), "SELECT $$hello$$ AS t, $q$it's$q$ AS u", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"t": "hello", "u": "it's"}]
    con, _ = open_tables(project, live=True)
    lines = iter(["EXPLAIN ANALYZE CREATE TABLE made AS SELECT 1;", "SELECT count(*) AS n", "FROM examples"])

    def read(_: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    out, err = io.StringIO(), io.StringIO()
    assert run_shell(con, read=read, out=out, err=err) == 0
    assert err.getvalue().startswith("SQL error: CREATE is refused")  # nothing created ...
    assert "made" not in {t for (t,) in con.sql("SHOW TABLES").fetchall()}
    assert out.getvalue().split() == ["n", str(N)]  # ... and the last statement ran at the end of input
