"""No password in any output, whatever the DSN looks like (issue 12, "Secrets").

A corpus of awkward DSNs (each URL delimiter unescaped in the password, percent-escapes, a missing ``//``, IPv6
hosts, ``?password=``/``sslpassword=`` parameters, the PG* and DB_* variables) is thrown at every place that can
print one: the config's repr/str/describe/safe_dsn, the error of a refused config, ``open_store`` against a port
where nothing listens and against a real server that checks passwords (the exception's str, repr and full
traceback with its ``__cause__`` chain, and every log record), and ``python -m storage status`` run as a
subprocess. Each output is searched for the password and for its distinctive pieces.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import traceback
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import pytest

import storage
from storage import StoreConfig
from storage.dsn import redact_dsn
from tests._pg import Cluster, free_port

ROOT = Path(__file__).resolve().parent.parent
#: Two distinctive halves: a URL parser may cut the password at its special character, and a driver may echo
#: either half on its own.
HEAD, TAIL = "S3cretHd", "Xq9ZkTl"
SPECIALS = "#/?@:&=% []'\"\\"
REAL_PASSWORD = "right-Pw"


def password(special: str) -> str:
    return f"{HEAD}{special}{TAIL}"


def corpus(host: str, port: int) -> list[tuple[str, dict[str, str], str]]:
    """``(label, environment, password)`` triples: every way a DSN (or its parts) can reach the library."""
    hostport = f"{host}:{port}"
    cases: list[tuple[str, dict[str, str], str]] = []
    for c in SPECIALS:
        pw = password(c)
        cases.append((f"raw {c!r}", {"DATABASE_URL": f"postgresql://postgres:{pw}@{hostport}/postgres"}, pw))
        cases.append((f"escaped {c!r}",
                      {"DATABASE_PUBLIC_URL": f"postgresql://postgres:{quote(pw, safe='')}@{hostport}/postgres"},
                      pw))
        cases.append((f"PG* {c!r}", {"PGHOST": host, "PGPORT": str(port), "PGUSER": "postgres", "PGPASSWORD": pw,
                                     "PGDATABASE": "postgres"}, pw))
        cases.append((f"DB_* {c!r}", {"DB_HOST": host, "DB_PORT": str(port), "DB_USER": "postgres",
                                      "DB_PASSWORD": pw, "DB_NAME": "postgres"}, pw))
    pw = password("-")
    for label, dsn in [
        ("missing //", f"postgresql:postgres:{pw}@{hostport}/postgres"),
        ("missing :", f"postgresql//postgres:{pw}@{hostport}/postgres"),
        ("one slash", f"postgresql:/postgres:{pw}@{hostport}/postgres"),
        ("postgres scheme", f"postgres://postgres:{pw}@{hostport}/postgres"),
        ("ipv6", f"postgresql://postgres:{pw}@[::1]:{port}/postgres"),
        ("ipv6 and #", f"postgresql://postgres:{password('#')}@[::1]:{port}/postgres"),
        ("?password=", f"postgresql://postgres@{hostport}/postgres?password={pw}"),
        ("?password= and #", f"postgresql://postgres@{hostport}/postgres?sslmode=disable&password={password('#')}"),
        ("sslpassword=", f"postgresql://postgres@{hostport}/postgres?sslpassword={pw}&sslmode=disable"),
        ("both", f"postgresql://postgres:{pw}@{hostport}/postgres?password={pw}"),
        ("no user", f"postgresql://:{pw}@{hostport}/postgres"),
        ("two @ and /", f"postgresql://postgres:{password('@/')}@{hostport}/postgres"),
    ]:
        cases.append((label, {"DATABASE_URL": dsn}, password("#") if "#" in label else
                      password("@/") if "@ and /" in label else pw))
    return cases


def leaks(text: str, pw: str) -> list[str]:
    """The forms of ``pw`` found in ``text`` (the password, its percent-encoding, its distinctive halves)."""
    return [form for form in {pw, quote(pw, safe=""), HEAD, TAIL} if form in text]


def outputs_of_config(env: dict[str, str]) -> tuple[StoreConfig | None, list[str]]:
    try:
        config = StoreConfig.from_env(env)
    except storage.ValidationError as exc:
        return None, [str(exc), repr(exc), "".join(traceback.format_exception(exc))]
    return config, [repr(config), str(config), config.describe(), str(config.safe_dsn), repr(config.safe_dsn)]


async def outputs_of_open(config: StoreConfig, caplog: pytest.LogCaptureFixture) -> list[str]:
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        try:
            store = await storage.open_store(config=config)
        except storage.DatabaseError as exc:
            texts = [str(exc), repr(exc), "".join(traceback.format_exception(exc))]
        else:  # pragma: no cover - the password is wrong / the port is closed: this must not happen
            await store.close()
            raise AssertionError(f"opened {config!r}")
    return texts + [caplog.text] + [repr(r.args) for r in caplog.records]


@pytest.fixture(scope="module")
def auth_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A server that checks passwords (scram-sha-256), so that a wrong password is refused by the server."""
    cluster = Cluster.create(tmp_path_factory.mktemp("pg-secrets"), password=REAL_PASSWORD)
    try:
        yield cluster
    finally:
        cluster.cleanup()


@pytest.fixture(params=["unreachable port", "server checking passwords"])
def target(request: pytest.FixtureRequest) -> tuple[str, int]:
    if request.param == "unreachable port":
        return "127.0.0.1", free_port()
    cluster: Cluster = request.getfixturevalue("auth_cluster")
    return "127.0.0.1", cluster.port


async def test_no_password_in_config_output_open_errors_tracebacks_or_logs(target: tuple[str, int], caplog):
    host, port = target
    opened = 0
    for label, env, pw in corpus(host, port):
        config, texts = outputs_of_config(env)
        if config is not None:
            assert config.backend == "postgres", label
            texts += await outputs_of_open(config, caplog)
            opened += 1
        for text in texts:
            assert not leaks(text, pw), f"{label}: {leaks(text, pw)} in {text!r}"
    assert opened >= 40  # most of the corpus reaches the driver, not only the config's checks


def run_status(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("DATABASE_", "PG", "DB_", "STORAGE_"))}
    base["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "storage", "-v", "status"], capture_output=True, text=True,
                          timeout=120, cwd=cwd, env={**base, **env})


def test_no_password_in_the_cli_status_line_or_its_errors(auth_cluster: Cluster, tmp_path: Path):
    closed = free_port()
    cases = corpus("127.0.0.1", auth_cluster.port)[::3] + corpus("127.0.0.1", closed)[1::3]
    # each case is a fresh interpreter that spends most of its time importing: four at a time
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda case: run_status(case[1], tmp_path), cases))
    for (label, _env, pw), result in zip(cases, results):
        assert result.returncode != 0, (label, result.stdout)
        assert "Traceback" not in result.stderr, (label, result.stderr)
        found = leaks(result.stdout + result.stderr, pw)
        assert not found, f"{label}: {found} in {result.stdout + result.stderr!r}"


def test_the_cli_status_line_names_the_target_without_the_password(auth_cluster: Cluster, tmp_path: Path):
    pw = password("#")
    result = run_status({"DATABASE_URL": f"postgresql://postgres:{pw}@127.0.0.1:{auth_cluster.port}/postgres"},
                        tmp_path)
    assert f"postgresql://postgres:***@127.0.0.1:{auth_cluster.port}/postgres" in result.stdout
    assert "authentication failed" in result.stderr or "invalid" in result.stderr, result.stderr
    assert not leaks(result.stdout + result.stderr, pw)


@pytest.mark.parametrize("dsn, expected", [
    ("postgresql://u:S3c#ret@h:5432/db", "postgresql://u:***@h:5432/db"),
    ("postgresql://u:S3c/ret@h/db", "postgresql://u:***@h/db"),
    ("postgresql://u:S3c?ret@h/db", "postgresql://u:***@h/db"),
    ("postgresql://u:S3c@ret@h/db", "postgresql://u:***@h/db"),
    ("postgresql//u:S3cret@h/db", "postgresql//u:***@h/db"),
    ("postgresql:/u:S3cret@h/db", "postgresql:/u:***@h/db"),
    ("postgresql:u:S3cret@h/db", "postgresql:u:***@h/db"),
    ("u:S3cret@h/db", "u:***@h/db"),
    ("postgresql://u:S3cret@[::1]:5432/db", "postgresql://u:***@[::1]:5432/db"),
    ("postgresql://h/db?sslpassword=S3c#ret&sslmode=require", "postgresql://h/db?sslpassword=***&sslmode=require"),
    ("postgresql://u/x@h/db", "postgresql://***@h/db"),  # an ambiguous user information is hidden whole
    ("postgresql:///db?host=/run/postgresql", "postgresql:///db?host=/run/postgresql"),
])
def test_redaction_does_not_depend_on_the_url_parsing(dsn: str, expected: str):
    assert redact_dsn(dsn) == expected


def test_a_malformed_scheme_is_refused_before_any_driver_sees_it():
    with pytest.raises(storage.ValidationError, match="must start with postgresql://") as info:
        StoreConfig(backend="postgres", dsn="postgresql:/u:S3cretPw@127.0.0.1:5432/db")
    assert "S3cretPw" not in str(info.value)
