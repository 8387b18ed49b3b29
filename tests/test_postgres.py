"""The PostgreSQL store: the same schema as SQLite, and daemons of several hosts sharing plans
through one server. Runs against a real server (see ``postgres_server`` in conftest)."""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path

import pytest

from conftest import REQUIRE_POSTGRES, Home, ThrowawayPostgres, _kill_daemon, _postgres_binaries
from hypatia.config import ConfigError, load
from hypatia.planner.databases import PostgresDatabase, SqliteDatabase
from hypatia.planner.schema import SCHEMA_VERSION, TABLES
from hypatia.planner.store import Store, StoreError
from test_end_to_end import run_client
from test_store import put, sample

# SQLite's declared types and PostgreSQL's, as one family each.
FAMILIES = {"TEXT": "text", "INTEGER": "integer", "BIGINT": "integer", "FLOAT": "real", "REAL": "real", "DOUBLE PRECISION": "real",
            "BLOB": "bytes", "BYTEA": "bytes"}


def sqlite_schema(path: Path) -> dict[str, dict[str, str]]:
    db = SqliteDatabase(path)
    try:
        return {t: {row[1]: FAMILIES[row[2].upper()] for row in db.execute(f'PRAGMA table_info("{t}")').fetchall()}
                for t in TABLES}
    finally:
        db.close()


def postgres_schema(url: str) -> dict[str, dict[str, str]]:
    db = PostgresDatabase(url)
    try:
        rows = db.execute(
            "SELECT table_name, column_name, upper(data_type) FROM information_schema.columns "
            "WHERE table_schema = current_schema()"
        ).fetchall()
    finally:
        db.close()
    schema: dict[str, dict[str, str]] = {}
    for table, column, kind in rows:
        schema.setdefault(table, {})[column] = FAMILIES[kind]
    return {t: schema[t] for t in TABLES}


def test_both_databases_get_the_same_tables_columns_and_types(tmp_path, postgres_url):
    Store(tmp_path / "s.sqlite").close()
    Store(postgres_url).close()
    assert postgres_schema(postgres_url) == sqlite_schema(tmp_path / "s.sqlite")


def test_daemons_starting_together_migrate_once(postgres_url):
    """Several stores opening one empty database at the same moment: the advisory lock lets one
    migrate and the others find the schema done."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def open_store() -> None:
        barrier.wait()
        try:
            Store(postgres_url).close()
        except BaseException as exc:  # collected and asserted on below
            errors.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    store = Store(postgres_url, readonly=True)
    assert store.query("SELECT version FROM hypatia_schema") == [(SCHEMA_VERSION,)]
    store.close()


def test_writers_on_two_connections_share_rows(postgres_url):
    """Two stores (two daemons) on one database: what one writes the other serves."""
    a, b = Store(postgres_url), Store(postgres_url)
    graph, keys, env = sample()
    assert b.get_plan(keys) is None
    put(a, graph, keys, env)
    put(b, graph, keys, env)  # the same plan from the second host: an update, no conflict error
    assert b.get_plan(keys) == a.get_plan(keys)
    assert a.counts()["plans"] == 1
    a.close()
    b.close()


def test_readonly_store_refuses_to_write(postgres_url):
    Store(postgres_url).close()
    store = Store(postgres_url, readonly=True)
    graph, keys, env = sample()
    with pytest.raises(Exception, match="read-only"):
        put(store, graph, keys, env)
    store.close()


def test_an_unreachable_server_is_a_clear_error():
    with pytest.raises(StoreError, match=r"cannot reach the PostgreSQL store postgresql://hy:\*\*\*@127\.0\.0\.1:1/x.*HYPATIA_STORE"):
        Store("postgresql://hy:secret@127.0.0.1:1/x")


def test_a_store_url_of_another_kind_is_refused():
    with pytest.raises(ConfigError, match="not a postgresql:// URL"):
        load({"HYPATIA_HOME": "/tmp/hy-x", "HYPATIA_STORE": "mysql://root@localhost/x"})


def _second_home(url: str) -> Home:
    path = Path(tempfile.mkdtemp(prefix="hy-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYPATIA_")}
    env |= {"HYPATIA_HOME": str(path), "PYTHONUNBUFFERED": "1", "HYPATIA_STORE": url}
    return Home(path, env, load(env))


@pytest.mark.slow
def test_two_daemons_share_plans_through_one_server(home, postgres_url):
    """Two hosts, each with its own daemon, sharing one PostgreSQL store: the graphs planned for a
    process on the first are plan-cache hits for a process on the second."""
    url = postgres_url.replace("postgresql://postgres@", "postgresql://postgres:hunter2@")  # trust ignores it
    home.env["HYPATIA_STORE"] = url
    other = _second_home(url)
    try:
        home.hypatiad("start")
        other.hypatiad("start")
        first = run_client(home, extra_env={"HYPATIA_AUTOSTART": "0"})
        assert first["daemon_misses"] == 1 and first.get("local_plans", 0) == 0
        second = run_client(other, extra_env={"HYPATIA_AUTOSTART": "0"})
        assert second["daemon_hits"] == 1 and second.get("daemon_misses", 0) == 0

        a, b = home.stats(), other.stats()
        assert a["plan_cache"]["plans_made"] == 1 and b["plan_cache"]["plans_made"] == 0
        assert b["plan_cache"]["hits"] == 1 and b["plans"] == 1
        for s in (a, b):
            assert s["store"]["path"].startswith("postgresql://postgres:***@") and "hunter2" not in json.dumps(s)
        listed = json.loads(other.ctl("plans", "--json").stdout)
        assert len(listed) == 1 and {p["graph_key"] for p in listed} == {p["graph_key"] for p in json.loads(home.ctl("plans", "--json").stdout)}

        other.hypatiad("stop")
        offline = other.stats()  # the daemon is down: read straight from the server
        assert offline["running"] is False and offline["plans"] == 1
    finally:
        _kill_daemon(other.config)


@pytest.mark.slow
def test_a_daemon_whose_server_is_down_does_not_start_and_clients_fall_back(home):
    home.env["HYPATIA_STORE"] = "postgresql://postgres@127.0.0.1:1/hypatia"
    proc = home.hypatiad("start", check=False)
    assert proc.returncode != 0
    assert "cannot reach the PostgreSQL store" in proc.stdout + proc.stderr
    assert home.daemon_pid() is None
    result = run_client(home, extra_env={"HYPATIA_AUTOSTART": "0"})
    assert result["local_plans"] == 1


def test_a_throwaway_server_from_local_binaries():
    """What a machine without a running server does: initdb + pg_ctl in a temporary directory."""
    bindir = _postgres_binaries()
    if bindir is None:
        if REQUIRE_POSTGRES:
            pytest.fail("HYPATIA_REQUIRE_POSTGRES=1 but no initdb was found", pytrace=False)
        pytest.skip("no initdb on this machine: nothing to start a throwaway server from")
    server = ThrowawayPostgres(bindir)
    try:
        server.start()
        store = Store(server.url)
        graph, keys, env = sample()
        put(store, graph, keys, env)
        assert store.get_plan(keys) is not None
        store.close()
    finally:
        server.stop()
    assert not server.dir.exists()
