"""Environment resolution, in DESIGN.md's order, and password redaction."""

from __future__ import annotations

import pytest

from storage import StoreConfig, ValidationError, open_store
from storage.config import redact_dsn


def test_default_is_json_in_config():
    cfg = StoreConfig.from_env({})
    assert (cfg.backend, cfg.path, cfg.dsn) == ("json", "config", None)


def test_storage_path():
    assert StoreConfig.from_env({"STORAGE_PATH": "/data/bot"}).path == "/data/bot"


def test_database_public_url_preferred_over_everything():
    cfg = StoreConfig.from_env({
        "DATABASE_PUBLIC_URL": "postgresql://pub:pw1@public.example:5432/db1",
        "DATABASE_URL": "postgresql://int:pw2@internal:5432/db2",
        "PGHOST": "pghost", "DB_HOST": "dbhost",
    })
    assert cfg.backend == "postgres"
    assert cfg.dsn == "postgresql://pub:pw1@public.example:5432/db1"
    assert cfg.source == "DATABASE_PUBLIC_URL"


def test_database_url_second():
    cfg = StoreConfig.from_env({"DATABASE_URL": "postgresql://u@h/d", "PGHOST": "pghost"})
    assert cfg.dsn == "postgresql://u@h/d"


def test_railway_pg_variables():
    cfg = StoreConfig.from_env({"PGHOST": "containers.railway.app", "PGPORT": "6543", "PGUSER": "postgres",
                                "PGPASSWORD": "p@ss:w/rd", "PGDATABASE": "railway", "DB_HOST": "ignored"})
    assert cfg.dsn == "postgresql://postgres:p%40ss%3Aw%2Frd@containers.railway.app:6543/railway"
    assert "p@ss" not in repr(cfg) and "p%40ss" not in repr(cfg)


def test_local_db_variables():
    cfg = StoreConfig.from_env({"DB_HOST": "localhost", "DB_PORT": "5432", "DB_USER": "bot", "DB_PASSWORD": "pw",
                                "DB_NAME": "botdb"})
    assert cfg.dsn == "postgresql://bot:pw@localhost:5432/botdb"
    assert cfg.backend == "postgres"


def test_storage_backend_forces_json_even_with_a_url():
    cfg = StoreConfig.from_env({"STORAGE_BACKEND": "json", "DATABASE_URL": "postgresql://u:pw@h/d"})
    assert cfg.backend == "json"


def test_storage_backend_postgres_needs_a_dsn():
    with pytest.raises(ValidationError):
        StoreConfig.from_env({"STORAGE_BACKEND": "postgres"})
    cfg = StoreConfig.from_env({"STORAGE_BACKEND": "POSTGRES", "DB_HOST": "h", "DB_NAME": "d"})
    assert cfg.backend == "postgres" and cfg.dsn == "postgresql://h/d"


def test_bad_backend_value():
    with pytest.raises(ValidationError):
        StoreConfig.from_env({"STORAGE_BACKEND": "sqlite"})


def test_pool_and_pgbouncer_settings():
    cfg = StoreConfig.from_env({"DATABASE_URL": "postgresql://h/d", "STORAGE_POOL_MIN": "2", "STORAGE_POOL_MAX": "20",
                                "STORAGE_PGBOUNCER": "1"})
    assert (cfg.pool_min, cfg.pool_max, cfg.pgbouncer) == (2, 20, True)
    with pytest.raises(ValidationError):
        StoreConfig.from_env({"STORAGE_POOL_MAX": "lots"})
    with pytest.raises(ValidationError):
        StoreConfig.from_env({"STORAGE_POOL_MIN": "5", "STORAGE_POOL_MAX": "2"})
    with pytest.raises(ValidationError):
        StoreConfig.from_env({"STORAGE_PGBOUNCER": "maybe"})


def test_password_never_in_repr_str_or_describe():
    cfg = StoreConfig.from_env({"DATABASE_URL": "postgresql://user:hunter2@db.example:5432/bot?password=hunter2"})
    for text in (repr(cfg), str(cfg), cfg.describe(), str(cfg.safe_dsn)):
        assert "hunter2" not in text
    assert "user:***@db.example:5432/bot" in repr(cfg)


@pytest.mark.parametrize("dsn, expected", [
    ("postgresql://u:secret@h:1/d", "postgresql://u:***@h:1/d"),
    ("postgresql://u@h/d", "postgresql://u@h/d"),
    ("postgresql://h/d?sslmode=require&password=secret", "postgresql://h/d?sslmode=require&password=***"),
    (None, None),
])
def test_redact_dsn(dsn, expected):
    assert redact_dsn(dsn) == expected


def test_open_store_rejects_config_plus_options():
    with pytest.raises(ValidationError):
        open_store(StoreConfig(), backend="json")


async def test_open_store_from_env_uses_storage_path(tmp_path, monkeypatch):
    for name in ("DATABASE_PUBLIC_URL", "DATABASE_URL", "PGHOST", "DB_HOST", "STORAGE_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("STORAGE_PATH", str(tmp_path / "botdata"))
    async with open_store() as store:
        await store.put("things", "a", {})
    assert (tmp_path / "botdata" / "things.json").exists()
