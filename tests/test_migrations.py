"""Migrations on every backend: ordering, round trips, atomicity, drift, locking, crash detection, the CLI.

The process tests start real children (``python -c`` importing this module's ``child_main``) on the same store:
one more ``Migrator`` in the same process would share nothing that matters less than a real process does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import storage
from examples.migrations import MIGRATIONS as EXAMPLES
from storage import LockTimeoutError, MigrationError, StoreConfig, ValidationError
from storage.migrations import (
    LEDGER,
    LOG,
    NOTES,
    STATE,
    DirtyMigrationError,
    Migration,
    MigrationContext,
    MigrationFailedError,
    MigrationStatus,
    MigrationValidationError,
    Migrator,
    parse_version,
)
from storage.migrations.ledger import RESERVED

ROOT = Path(__file__).resolve().parent.parent

SEED_MEMBERS = {
    "987654321_123456789": {
        "user_id": "123456789", "guild_id": "987654321", "join_date": "2024-01-01T00:00:00Z",
        "roles": ["role1", "role2"], "preferences": {"notifications": True, "language": "en"},
        "statistics": {"message_count": 150, "last_active": "2024-01-15T12:00:00Z"},
    },
    "987654321_222": {"user_id": "222", "guild_id": "987654321", "roles": [],
                      "statistics": {"message_count": 0}},
    "987654321_333": {"user_id": "333", "guild_id": "987654321", "activity": {"voice_minutes": 12},
                      "statistics": {"message_count": 7, "last_active": "2024-02-01T00:00:00Z"}},
    "987654321_444": {"user_id": "444", "guild_id": "987654321"},
}


async def snapshot(store: Any, *, ledger: bool = True) -> dict[str, dict[str, Any]]:
    out = {}
    for name in await store.collections():
        if ledger or name not in RESERVED:
            out[name] = {key: doc async for key, doc in store.items(name)}
    return out


async def seed(store: Any) -> None:
    await store.put_many("members", SEED_MEMBERS)
    await store.put("guilds", "987654321", {"name": "test guild", "prefix": "!"})


# -- small migrations used below -------------------------------------------------------------------------------------
class Tagged(Migration):
    """Writes one document named after its version; down removes it."""

    async def up(self, store: MigrationContext) -> None:
        await store.put("tags", self.version, {"v": 1})

    async def down(self, store: MigrationContext) -> None:
        await store.delete("tags", self.version)


class TaggedEdited(Migration):
    """Tagged, as someone edited it after it had been applied."""

    async def up(self, store: MigrationContext) -> None:
        await store.put("tags", self.version, {"v": 2})

    async def down(self, store: MigrationContext) -> None:
        await store.delete("tags", self.version)


class Trace(Migration):
    """Appends "up X" / "down X" to one document, so the order of execution is visible in the data."""

    async def up(self, store: MigrationContext) -> None:
        await store.update("trace", "order", lambda d: {"events": [*d.get("events", []), f"up {self.version}"]})

    async def down(self, store: MigrationContext) -> None:
        await store.update("trace", "order", lambda d: {"events": [*d.get("events", []), f"down {self.version}"]})


class WritesThenFails(Migration):
    """Uses every kind of write, then raises: nothing of it may remain."""

    async def up(self, store: MigrationContext) -> None:
        await store.put("guilds", "987654321", {"name": "renamed"})
        await store.put_many("new_collection", {"a": {"x": 1}, "b": {"x": 2}})
        assert await store.delete("members", "987654321_444")
        await store.update("members", "987654321_222", lambda d: {**d, "roles": ["x"]})
        await store.save_member_data(555, 987654321, {"roles": []})
        assert await store.count("new_collection") == 2  # the step sees its own writes
        raise RuntimeError("boom")


class NoDown(Migration):
    async def up(self, store: MigrationContext) -> None:
        await store.put("tags", self.version, {})


class Slow(Migration):
    """For the two-process test: counts its own executions in the data and takes a moment, so runs overlap."""

    async def up(self, store: MigrationContext) -> None:
        await store.update("runs", self.version, lambda d: {"n": d.get("n", 0) + 1})
        await asyncio.sleep(0.3)

    async def down(self, store: MigrationContext) -> None:
        await store.delete("runs", self.version)


class Hangs(Migration):
    """For the kill -9 test: writes, says so, then blocks until the parent kills the process."""

    version = "2.0.0"
    description = "blocks forever"

    async def up(self, store: MigrationContext) -> None:
        await store.put("probe", "written", {"by": "the killed migration"})
        print("READY", flush=True)
        await asyncio.sleep(3600)


class Finishes(Migration):
    """The fixed version of Hangs, deployed after the crash."""

    version = "2.0.0"
    description = "blocks forever (fixed)"

    async def up(self, store: MigrationContext) -> None:
        await store.put("probe", "written", {"by": "the fixed migration"})

    async def down(self, store: MigrationContext) -> None:
        await store.delete("probe", "written")


# -- child processes -------------------------------------------------------------------------------------------------
async def _child(mode: str, config: StoreConfig) -> None:
    store = await storage.open_store(config=config)
    try:
        if mode == "upgrade":
            print("READY", flush=True)
            await asyncio.to_thread(sys.stdin.readline)  # the parent starts both children at the same moment
            run = await Migrator(store, [Slow("1.1.0", "slow one"), Slow("1.2.0", "slow two")]).upgrade(backup=False)
            print(json.dumps(run.versions), flush=True)
        elif mode == "hang":
            await Migrator(store, [Hangs()]).upgrade(backup=False)
        else:
            raise SystemExit(f"unknown mode {mode}")
    finally:
        await store.close()


def child_main(argv: list[str]) -> None:
    mode, raw = argv
    asyncio.run(_child(mode, StoreConfig(**json.loads(raw))))


def spawn(mode: str, config: StoreConfig) -> subprocess.Popen[str]:
    code = "import sys; from tests.test_migrations import child_main; child_main(sys.argv[1:])"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-c", code, mode, json.dumps(dataclasses.asdict(config))],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT)


# -- versions --------------------------------------------------------------------------------------------------------
def test_versions_compare_as_versions():
    assert parse_version("1.10.0") > parse_version("1.9.0") > parse_version("1.2")
    assert parse_version("1.1") == parse_version("1.1.0")
    assert parse_version("0") < parse_version("0.0.1")
    assert sorted(["1.10.0", "1.9.0", "1.2", "10.0"], key=parse_version) == ["1.2", "1.9.0", "1.10.0", "10.0"]


@pytest.mark.parametrize("bad", ["1.a", "", "01.2", "1..2", " 1.0", "v1.0", "1.0-beta", 1.0, None])
async def test_malformed_versions_are_rejected_up_front(store, bad):
    with pytest.raises(MigrationError, match="version"):
        Migrator(store, [Tagged(bad, "bad")])  # a str is parsed by the Migrator, anything else refused at once


async def test_duplicates_reserved_and_non_migrations_are_rejected(store):
    with pytest.raises(MigrationError, match=r"duplicate migration version 1\.1\.0"):
        Migrator(store, [Tagged("1.1", "a"), Tagged("1.2.0", "b"), Trace("1.1.0", "c")])
    with pytest.raises(MigrationError, match="reserved"):
        Migrator(store, [Tagged("0.0", "zero")])
    with pytest.raises(MigrationError, match="not a Migration"):
        Migrator(store, [Tagged("1.0.0", "ok"), "1.1.0"])  # type: ignore[list-item]
    assert await snapshot(store) == {}


async def test_migrations_run_in_version_order_whatever_the_list_order(store):
    migrator = Migrator(store, [Trace("1.10.0", "c"), Trace("1.9.0", "b"), Trace("1.2", "a")])
    assert [m.version for m in migrator.migrations] == ["1.2", "1.9.0", "1.10.0"]
    run = await migrator.upgrade(backup=False)
    assert run.versions == ["1.2", "1.9.0", "1.10.0"]
    assert (await store.get("trace", "order"))["events"] == ["up 1.2", "up 1.9.0", "up 1.10.0"]


# -- round trips -----------------------------------------------------------------------------------------------------
async def test_example_migrations_round_trip_leaves_the_data_identical(store):
    await seed(store)
    before = await snapshot(store)
    migrator = Migrator(store, EXAMPLES)

    run = await migrator.upgrade(backup=False)
    assert run.versions == ["1.1.0", "1.2.0"]
    members = {k: d async for k, d in store.items("members")}
    alice = members["987654321_123456789"]
    assert alice["preferences"] == {"notifications": True, "language": "en"}  # kept, not overwritten
    assert alice["activity"] == {"messages": 150}
    assert alice["statistics"] == {"last_active": "2024-01-15T12:00:00Z"}
    assert members["987654321_222"]["preferences"] == {"notifications": True, "language": "ja"}
    assert members["987654321_333"]["activity"] == {"voice_minutes": 12, "messages": 7}
    assert members["987654321_444"] == {"user_id": "444", "guild_id": "987654321",
                                        "preferences": {"notifications": True, "language": "ja"}}
    status = await migrator.status()
    assert status.current == "1.2.0" and not status.pending and not status.dirty
    assert [a.version for a in status.applied] == ["1.1.0", "1.2.0"]
    assert (await migrator.upgrade(backup=False)).steps == ()

    partial = await migrator.downgrade(target="1.1.0", backup=False)
    assert partial.versions == ["1.2.0"]
    assert (await store.get("members", "987654321_123456789"))["statistics"]["message_count"] == 150

    await migrator.downgrade(target="0", backup=False)
    assert await snapshot(store, ledger=False) == before
    assert await store.count(LEDGER) == 0 and await store.count(NOTES) == 0 and await store.count(STATE) == 0
    events = [(e.event, e.version) for e in await migrator.history()]
    assert events == [("apply", "1.1.0"), ("apply", "1.2.0"), ("rollback", "1.2.0"), ("rollback", "1.1.0")]

    again = await migrator.upgrade(backup=False)  # and forward again after a full rollback
    assert again.versions == ["1.1.0", "1.2.0"]


async def test_the_design_snippet_runs_as_written(store):
    from examples.migrations import AddUserPreferences

    await seed(store)
    before = await snapshot(store, ledger=False)
    m = Migrator(store, [AddUserPreferences()])
    assert (await m.status()).current is None
    assert [x.version for x in await m.plan()] == ["1.1.0"]
    assert (await m.upgrade()).versions == ["1.1.0"]
    assert await m.validate() == []
    assert (await m.downgrade(target="1.0.0")).versions == ["1.1.0"]
    assert await snapshot(store, ledger=False) == before


async def test_downgrade_goes_in_applied_order_not_version_order(store):
    first = Migrator(store, [Trace("1.1.0", "a"), Trace("1.3.0", "c")])
    await first.upgrade(backup=False)
    late = Migrator(store, [Trace("1.1.0", "a"), Trace("1.2.0", "b, merged late"), Trace("1.3.0", "c")])
    with pytest.raises(MigrationValidationError) as refused:
        await late.upgrade(backup=False)
    assert [(p.kind, p.version) for p in refused.value.problems] == [("out_of_order", "1.2.0")]
    assert (await late.upgrade(backup=False, force=True)).versions == ["1.2.0"]

    status = await late.status()
    assert [a.version for a in status.applied] == ["1.1.0", "1.3.0", "1.2.0"]
    assert status.current == "1.3.0"
    assert [m.version for m in await late.plan_downgrade(steps=2)] == ["1.2.0", "1.3.0"]
    assert (await late.downgrade(steps=2, backup=False)).versions == ["1.2.0", "1.3.0"]
    assert (await store.get("trace", "order"))["events"] == ["up 1.1.0", "up 1.3.0", "up 1.2.0", "down 1.2.0",
                                                             "down 1.3.0"]
    assert (await late.downgrade(backup=False)).versions == ["1.1.0"]  # default: one step


async def test_downgrade_arguments_and_irreversible_migrations(store):
    migrator = Migrator(store, [Tagged("1.0.0", "a"), NoDown("1.1.0", "one way"), Tagged("1.2.0", "c")])
    await migrator.upgrade(backup=False)
    before = await snapshot(store)
    with pytest.raises(MigrationError, match="not both"):
        await migrator.downgrade(target="1.0.0", steps=1)
    with pytest.raises(MigrationError, match="only 3 applied"):
        await migrator.downgrade(steps=4)
    with pytest.raises(MigrationError, match="positive"):
        await migrator.downgrade(steps=0)
    with pytest.raises(MigrationError, match="target must be dot-separated numbers"):
        await migrator.downgrade(target="latest")
    with pytest.raises(MigrationError, match=r"cannot roll back 1\.1\.0 .*no down\(\)"):
        await migrator.downgrade(target="1.0.0")
    assert await snapshot(store) == before  # refused up front: 1.2.0 was not rolled back either
    assert (await migrator.downgrade(steps=1, backup=False)).versions == ["1.2.0"]


# -- atomicity -------------------------------------------------------------------------------------------------------
async def test_a_failing_up_changes_nothing(store):
    await seed(store)
    migrator = Migrator(store, [Tagged("1.0.0", "fine"), WritesThenFails("1.1.0", "fails")])
    await migrator.upgrade(target="1.0.0", backup=False)
    before = await snapshot(store)

    with pytest.raises(MigrationFailedError) as failed:
        await migrator.upgrade(backup=False)
    assert isinstance(failed.value.__cause__, RuntimeError) and "boom" in str(failed.value)
    assert failed.value.version == "1.1.0" and failed.value.completed.steps == ()
    assert await snapshot(store) == before  # data, ledger, log, notes and marker alike
    status = await migrator.status()
    assert status.current == "1.0.0" and [p.version for p in status.pending] == ["1.1.0"] and not status.dirty


async def test_earlier_steps_of_a_failed_run_stay_applied(store):
    await seed(store)
    conflict = {**SEED_MEMBERS["987654321_222"], "activity": {"messages": 3}}
    await store.put("members", "987654321_222", conflict)  # 1.2.0 must refuse to overwrite activity.messages
    migrator = Migrator(store, EXAMPLES)
    with pytest.raises(MigrationFailedError, match="refusing to overwrite") as failed:
        await migrator.upgrade(backup=False)
    assert failed.value.completed.versions == ["1.1.0"]
    status = await migrator.status()
    assert status.current == "1.1.0" and [p.version for p in status.pending] == ["1.2.0"] and not status.dirty
    members = {k: d async for k, d in store.items("members")}
    assert all("preferences" in m for m in members.values())  # 1.1.0 committed
    assert all("message_count" in m["statistics"] for m in members.values() if "statistics" in m)  # 1.2.0 did not


async def test_seed_member_calls_work_inside_a_migration_and_the_ledger_is_off_limits(store):
    class UsesSeedCalls(Migration):
        async def up(self, store: MigrationContext) -> None:
            assert await store.save_member_data(123456789, 987654321, {"roles": ["a"]})
            written = await store.batch_update_members([
                {"user_id": 1, "guild_id": 987654321, "data": {"roles": []}},
                {"user_id": "not-an-id", "guild_id": 987654321, "data": {}},  # skipped and logged, as the seed did
            ])
            assert written == 1
            assert (await store.get_member_data(1, 987654321)) == {"roles": []}

        async def down(self, store: MigrationContext) -> None:
            await store.delete("members", "987654321_123456789")
            await store.delete("members", "987654321_1")

    class WritesLedger(Migration):
        async def up(self, store: MigrationContext) -> None:
            await store.put(LEDGER, "9.9.9", {"forged": True})

    await Migrator(store, [UsesSeedCalls("1.0.0", "seed calls")]).upgrade(backup=False)
    assert await store.get_member_data(123456789, 987654321) == {"roles": ["a"]}
    with pytest.raises(MigrationFailedError) as failed:
        await Migrator(store, [UsesSeedCalls("1.0.0", "seed calls"), WritesLedger("1.1.0", "bad")]).upgrade(
            backup=False)
    assert isinstance(failed.value.__cause__, ValidationError)
    assert await store.get(LEDGER, "9.9.9") is None


async def test_the_context_is_only_usable_during_its_step(store):
    kept: list[MigrationContext] = []

    class Leaks(Migration):
        async def up(self, store: MigrationContext) -> None:
            kept.append(store)

    await Migrator(store, [Leaks("1.0.0", "leaks its context")]).upgrade(backup=False)
    with pytest.raises(MigrationError, match="only usable inside"):
        await kept[0].put("tags", "late", {})
    assert await store.get("tags", "late") is None


async def test_escape_hatches_are_explicit_per_backend(store, backend):
    seen: dict[str, Any] = {}

    class Probe(Migration):
        async def up(self, store: MigrationContext) -> None:
            seen.update(backend=store.backend, has_connection=store.connection is not None)
            if store.backend == "postgres":
                seen["path"] = store.path
                # SQL on the step's own transaction: rolled back with everything else
                await store.connection.execute("CREATE TABLE migration_probe (x int)")
            else:
                folder = store.path
                assert folder is not None
                (folder / "attachments-index.txt").write_text("half-done")
            raise RuntimeError("after the escape hatch")

    migrator = Migrator(store, [Probe("1.0.0", "probe")])
    with pytest.raises(MigrationFailedError):
        await migrator.upgrade(backup=False)
    assert seen["backend"] == backend
    status = await migrator.status()
    if backend == "postgres":
        assert seen["has_connection"] and seen["path"] is None
        async with store.pool.acquire() as conn:  # type: ignore[attr-defined]
            assert await conn.fetchval("SELECT to_regclass('migration_probe')") is None
        assert not status.dirty  # everything it did was inside the transaction
    else:
        assert not seen["has_connection"]
        # files are outside the transaction: the migrator cannot know what changed, so a human must check
        assert status.dirty and status.in_progress is not None and status.in_progress.touched_files
        assert "ctx.path" in status.in_progress.explain() and "repair" in status.in_progress.explain()
        with pytest.raises(DirtyMigrationError):
            await migrator.upgrade(backup=False)
        assert (await migrator.repair()).cleared is not None
        assert not (await migrator.status()).dirty


# -- planning and validation -----------------------------------------------------------------------------------------
async def test_plan_is_a_dry_run(store):
    await seed(store)
    before = await snapshot(store)
    migrator = Migrator(store, EXAMPLES)
    assert [m.version for m in await migrator.plan()] == ["1.1.0", "1.2.0"]
    assert [m.version for m in await migrator.plan("1.1.0")] == ["1.1.0"]
    assert [m.version for m in await migrator.plan("1.1.5")] == ["1.1.0"]  # a target is a boundary
    assert await migrator.plan_downgrade(target="0") == []
    assert await snapshot(store) == before

    await migrator.upgrade(backup=False)
    after = await snapshot(store)
    assert await migrator.plan() == []
    assert [m.version for m in await migrator.plan_downgrade(target="0")] == ["1.2.0", "1.1.0"]
    assert await snapshot(store) == after


async def test_validate_reports_drift_missing_and_out_of_order(store):
    await Migrator(store, [Tagged("1.1.0", "a"), Tagged("1.2.0", "b")]).upgrade(backup=False)
    assert await Migrator(store, [Tagged("1.1.0", "a"), Tagged("1.2.0", "b")]).validate() == []

    edited = Migrator(store, [TaggedEdited("1.1.0", "a"), Tagged("1.0.5", "late")])
    problems = await edited.validate()
    assert {(p.kind, p.version) for p in problems} == {("changed", "1.1.0"), ("missing", "1.2.0"),
                                                       ("out_of_order", "1.0.5")}
    assert all(str(p) for p in problems)
    before = await snapshot(store)
    with pytest.raises(MigrationValidationError, match="changed since it was applied"):
        await edited.upgrade(backup=False)
    assert await snapshot(store) == before

    assert (await edited.upgrade(backup=False, force=True)).versions == ["1.0.5"]
    assert {p.kind for p in await edited.validate()} == {"changed", "missing"}
    repaired = await edited.repair()
    assert repaired.realigned == ("1.1.0",) and repaired.cleared is None
    assert [(p.kind, p.version) for p in await edited.validate()] == [("missing", "1.2.0")]
    assert [e.event for e in await edited.history()][-1] == "repair"
    with pytest.raises(MigrationError, match=r"cannot roll back 1\.2\.0 .*not in the migration list"):
        await edited.downgrade(steps=2)


# -- locking, backups, crashes ---------------------------------------------------------------------------------------
async def test_a_second_migrator_waits_for_the_lock_and_times_out(store):
    lock = store.migration_lock()
    assert await lock.acquire(0)
    try:
        migrator = Migrator(store, [Tagged("1.0.0", "a")], lock_timeout=0.3)
        with pytest.raises(LockTimeoutError, match="migration lock"):
            await migrator.upgrade(backup=False)
        assert (await migrator.status()).pending  # nothing ran
    finally:
        await lock.release()
    assert (await migrator.upgrade(backup=False)).versions == ["1.0.0"]


async def test_behind_pgbouncer_the_lock_is_transaction_scoped(store, store_config, backend):
    if backend != "postgres":
        pytest.skip("PostgreSQL only: the JSON lock is a file lock")
    async with storage.open_store(config=dataclasses.replace(store_config, pgbouncer=True)) as pooled:
        scoped = pooled.migration_lock()
        assert scoped._scoped  # type: ignore[attr-defined]
        assert await scoped.acquire(0)
        try:
            session = store.migration_lock()
            assert not await session.acquire(0.2)  # the same key, whichever kind holds it
        finally:
            await scoped.release()
        assert await session.acquire(0)
        await session.release()
        run = await Migrator(pooled, [Tagged("1.0.0", "a")]).upgrade(backup=False)
        assert run.versions == ["1.0.0"]
    assert await store.get("tags", "1.0.0") == {"v": 1}


async def test_two_processes_upgrading_at_once_apply_each_migration_once(store, store_config):
    procs = [spawn("upgrade", store_config) for _ in range(2)]
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "READY"
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    applied: list[str] = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        applied += json.loads(out.strip().splitlines()[-1])
    assert sorted(applied) == ["1.1.0", "1.2.0"]  # split between them, each exactly once
    assert {k: d["n"] async for k, d in store.items("runs")} == {"1.1.0": 1, "1.2.0": 1}
    log = [(d["event"], d["version"]) async for _, d in store.items(LOG)]
    assert sorted(log) == [("apply", "1.1.0"), ("apply", "1.2.0")]


async def test_a_killed_migration_is_detected_and_repaired(store, store_config):
    await seed(store)
    before = await snapshot(store)
    child = spawn("hang", store_config)
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line.strip() == "READY", child.stderr.read() if child.stderr else line
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=60)
        if child.stdout:
            child.stdout.close()
        if child.stderr:
            child.stderr.close()

    migrator = Migrator(store, [Finishes()])  # a fresh migrator, as on the next deploy
    status = await migrator.status()
    assert status.dirty and status.in_progress is not None
    assert status.in_progress.version == "2.0.0" and status.in_progress.pid == child.pid
    assert "dirty" in repr(status) and "repair" in status.in_progress.explain()
    assert [p.kind for p in await migrator.validate()] == ["interrupted"]
    assert await store.get("probe", "written") is None  # its transaction never committed
    assert await snapshot(store, ledger=False) == {k: v for k, v in before.items() if k not in RESERVED}
    assert await store.count(LEDGER) == 0
    with pytest.raises(DirtyMigrationError, match="repair"):
        await migrator.upgrade(backup=False)

    repaired = await migrator.repair()
    assert repaired.cleared is not None and repaired.cleared.pid == child.pid
    assert (await migrator.upgrade(backup=False)).versions == ["2.0.0"]
    assert (await store.get("probe", "written")) == {"by": "the fixed migration"}
    assert [e.event for e in await migrator.history()] == ["repair", "apply"]


async def test_a_backup_is_taken_first_unless_disabled(store):
    await seed(store)
    migrator = Migrator(store, [Tagged("1.0.0", "a"), Tagged("1.1.0", "b")])
    run = await migrator.upgrade(target="1.0.0")
    assert run.backup is not None
    backups = {b.id: b for b in await store.list_backups()}
    assert run.backup in backups and "1.0.0" in (backups[run.backup].label or "")
    assert (await store.verify_backup(run.backup)).ok
    assert (await migrator.upgrade(backup=False)).backup is None
    assert len(await store.list_backups()) == 1
    assert (await migrator.downgrade(steps=1)).backup is not None


def test_results_are_frozen_with_readable_reprs():
    status = MigrationStatus(current="1.1.0", applied=(), pending=())
    with pytest.raises(dataclasses.FrozenInstanceError):
        status.current = "2"  # type: ignore[misc]
    assert repr(status) == "MigrationStatus(current='1.1.0', applied=[], pending=[], clean)"
    assert repr(Tagged("1.1.0", "a")) == "<Tagged '1.1.0': 'a'>"


# -- command line ----------------------------------------------------------------------------------------------------
def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_PUBLIC_URL", "DATABASE_URL", "PGHOST", "DB_HOST", "STORAGE_BACKEND",
                        "STORAGE_PATH", "STORAGE_MIGRATIONS")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "storage", "migrate", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd, env=env)


def test_cli_end_to_end_on_a_json_folder(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "members.json").write_text(json.dumps(SEED_MEMBERS, indent=2))  # as the seed's code wrote it
    opts = ("--path", str(data), "--migrations", "examples.migrations")

    status = cli("status", *opts, cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert "current version: (none applied)" in status.stdout and "1.1.0" in status.stdout

    plan = cli("plan", *opts, cwd=tmp_path)
    assert plan.returncode == 0 and plan.stdout.index("1.1.0") < plan.stdout.index("1.2.0"), plan.stdout
    assert "_migrations.json" not in os.listdir(data)  # the dry run wrote nothing

    up = cli("up", *opts, cwd=tmp_path)
    assert up.returncode == 0, up.stderr
    assert "backup taken first" in up.stdout and "current version: 1.2.0" in up.stdout
    members = json.loads((data / "members.json").read_text())  # plain JSON again after close
    assert members["987654321_444"]["preferences"] == {"notifications": True, "language": "ja"}
    assert members["987654321_123456789"]["activity"] == {"messages": 150}
    assert len(os.listdir(tmp_path / "backups")) == 1

    assert cli("validate", *opts, cwd=tmp_path).returncode == 0
    history = cli("history", *opts, cwd=tmp_path)
    assert history.returncode == 0 and history.stdout.count("apply") == 2

    down = cli("down", "--target", "0", "--no-backup", *opts, cwd=tmp_path)
    assert down.returncode == 0, down.stderr
    assert json.loads((data / "members.json").read_text()) == SEED_MEMBERS
    assert len(os.listdir(tmp_path / "backups")) == 1


async def test_cli_exit_codes_for_problems_and_errors(tmp_path):
    data = tmp_path / "data"
    opts = ("--path", str(data), "--migrations", "examples.migrations")
    assert cli("up", "--target", "1.1.0", "--no-backup", *opts, cwd=tmp_path).returncode == 0
    async with storage.open_store(backend="json", path=data) as store:  # a crashed step's marker, as left by kill
        await store.put(STATE, "in_progress", {"version": "1.2.0", "direction": "up", "name": "x",
                                                "started_at": "2024-01-01T00:00:00Z", "host": "h", "pid": 1})
        ledger = await store.get(LEDGER, "1.1.0")
        await store.put(LEDGER, "1.1.0", {**ledger, "checksum": "sha256:" + "0" * 64})  # as if the code changed

    status = cli("status", *opts, cwd=tmp_path)
    assert status.returncode == 2 and "DIRTY" in status.stdout
    validate = cli("validate", *opts, cwd=tmp_path)
    assert validate.returncode == 2 and "[interrupted]" in validate.stdout and "[changed] 1.1.0" in validate.stdout
    up = cli("up", "--no-backup", *opts, cwd=tmp_path)
    assert up.returncode == 2 and "migrate repair" in up.stderr
    repair = cli("repair", *opts, cwd=tmp_path)
    assert repair.returncode == 0 and "cleared" in repair.stdout and "realigned" in repair.stdout
    assert cli("up", "--no-backup", *opts, cwd=tmp_path).returncode == 0

    nothing = cli("status", "--path", str(data), cwd=tmp_path)
    assert nothing.returncode == 1 and "--migrations" in nothing.stderr
    missing = cli("status", "--path", str(data), "--migrations", "no_such_module_here", cwd=tmp_path)
    assert missing.returncode == 1 and "no_such_module_here" in missing.stderr


def test_cli_loads_every_migration_subclass_of_a_module_without_a_list(tmp_path):
    (tmp_path / "botmigrations.py").write_text(
        "from storage.migrations import Migration\n"
        "from examples.migrations import AddUserPreferences  # imported, not defined here: not picked up\n\n"
        "class Base(Migration):  # a shared base: subclassed below, so not a migration itself\n"
        "    async def down(self, store):\n        pass\n\n"
        "class Second(Base):\n    def __init__(self):\n        super().__init__('1.10.0', 'second')\n"
        "    async def up(self, store):\n        await store.put('t', 'b', {})\n\n"
        "class First(Migration):\n    version = '1.9.0'\n    description = 'first'\n"
        "    async def up(self, store):\n        await store.put('t', 'a', {})\n")
    (tmp_path / "data").mkdir()  # the bot's store (migrate refuses a folder that holds none: a typo)
    (tmp_path / "data" / "members.json").write_text("{}")
    plan = cli("plan", "--path", str(tmp_path / "data"), "--migrations", "botmigrations", cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr
    lines = [line.split()[0] for line in plan.stdout.splitlines() if line.startswith("  ")]
    assert lines == ["1.9.0", "1.10.0"]
