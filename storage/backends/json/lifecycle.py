"""The JSON backend's lifecycle primitives (:class:`storage.lifecycle_calls.LifecyclePrimitives`): what an owner
owns, and forgetting it all or nothing (the protocol: :mod:`.forget_files`), on the store (:class:`JsonLifecycle`)
and inside a transaction (:class:`JsonTxLifecycle`, whose message side is staged by :mod:`.tx_messages` and
committed by :meth:`JsonLifecycle._commit_transaction`).

The event loop only copies references and awaits: matching keys over every collection, reading and rewriting
message files and decoding the owner's documents run in worker threads (a forget of a 1,000-member guild with
100k messages in a store of 100k members and 1M messages stalls the loop for a few ms; see
benchmarks/bench_lifecycle.py). Reads take no lock (like ``items()``): the documents are a snapshot of the
references taken on the loop, message files are only ever replaced atomically.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from ... import cancellation
from ...messages.records import bound_key
from ...ownership import Owner
from ...protocol import Document
from . import forget_files
from . import restore as json_restore
from .expiry import dead_keys
from .journal import Journal, Op, encode_in_slices, record_digest
from .message_files import MESSAGES_DIR, corrupt, list_files, order, parse_line, run_in_thread
from .messages import MessageLog
from .tables import Staged, Tables
from .tx_messages import Step, TxMessages, View, forget_step, prune_step

__all__ = ["JsonLifecycle", "JsonTxLifecycle", "owned_records", "count_owned", "records_in", "count_in"]

log = logging.getLogger("storage.json.restore")

Record = dict[str, Any]


def _decoded(data: Mapping[str, Mapping[str, bytes]], keys: dict[str, list[str]], dead: dict[str, set[str]],
             owner: Owner) -> dict[str, dict[str, Document]]:
    """The owner's visible documents among ``keys`` (collection -> its keys, copied on the loop; ``dead``: the
    expired ones, see json/expiry.py), decoded, sorted. A value is read from ``data`` here, in the thread (a dict
    lookup is atomic): one deleted meanwhile is left out."""
    out: dict[str, dict[str, Document]] = {}
    owns, loads = owner.owns_key, orjson.loads
    for name in sorted(keys):
        coll = data.get(name) or {}
        gone = dead.get(name) or set()
        found = {}
        for key in sorted(k for k in keys[name] if owns(k) and k not in gone):
            raw = coll.get(key)
            if raw is not None:
                found[key] = loads(raw)
        if found:
            out[name] = found
    return out


def _owned_in(keys: dict[str, list[str]], owner: Owner) -> dict[str, list[str]]:
    """The keys ``owner`` owns among ``keys`` (collection -> its keys), only collections with some; sorted (here,
    in the worker thread: sorting a 20k-member guild's keys on the loop cost a transaction's forget ~5 ms)."""
    owns = owner.owns_key
    return {name: sorted(found) for name in sorted(keys) if (found := [key for key in keys[name] if owns(key)])}


def _files(root: Path, owner: Owner) -> list[tuple[str, Path]]:
    return [(guild, path) for (guild, _month), path, _st in list_files(root)
            if owner.guild is None or guild == owner.guild]


def _view_files(view: View, owner: Owner) -> list[tuple[str, Path]]:
    return [(guild, path) for (guild, _month), path in view.listing(owner.guild)]


def owned_records(root: Path, owner: Owner) -> list[Record]:
    """Every record the owner owns (current versions: the last line of an id in its file), by (timestamp, id)."""
    return records_in(_files(root, owner), owner)


def records_in(files: list[tuple[str, Path]], owner: Owner) -> list[Record]:
    """:func:`owned_records` among ``files`` (``(guild, path)``: the store's files, or a transaction's view).

    A user's records are found with bytes searches (:func:`forget_files.lines_with`) before anything is parsed."""
    parts: list[list[Record]] = []
    needle = None if owner.user is None else b'"' + owner.user.encode() + b'"'
    for _guild, path in files:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue  # pruned meanwhile
        found: dict[str, Record] = {}
        # without a user, every line (the "match" is the newline that ends it)
        for start, stop in forget_files.lines_with(data, b"\n" if needle is None else needle):
            try:
                rec, _update = parse_line(data[start:stop])
            except ValueError as exc:
                raise corrupt(path, start, exc) from None
            if owner.owns_message(rec["guild_id"], rec["author_id"]):
                found[rec["message_id"]] = rec
        if found:
            parts.append(sorted(found.values(), key=order))
    return list(heapq.merge(*parts, key=order))


def count_owned(root: Path, owner: Owner) -> int:
    """How many records the owner owns."""
    return count_in(_files(root, owner), owner)


def count_in(files: list[tuple[str, Path]], owner: Owner) -> int:
    """:func:`count_owned` among ``files`` (a guild's: the distinct ids of its files, without parsing them)."""
    if owner.user is not None:
        return len(records_in(files, owner))
    total = 0
    for _guild, path in files:
        try:
            total += len(forget_files.file_ids(path, path.read_bytes()))
        except FileNotFoundError:
            continue
    return total


#: Operations of a transaction's record above which it is encoded and digested in a worker thread.
LARGE_RECORD = 2000
#: A transaction's forget stages its document deletions this many at a time, with a loop turn between.
STAGE_TURN = 1000


def _encoded(ops: list[Op]) -> tuple[bytes, str]:
    record = encode_in_slices(ops)
    return record, record_digest(record)


class JsonLifecycle:
    """Mixed into :class:`storage.backends.json.store.JsonBackend` (whose attributes are declared below)."""

    path: Path
    _tables: Tables
    _journal: Journal
    _messages: MessageLog
    _locked: Callable[[], AbstractAsyncContextManager[None]]
    _commit: Callable[..., Awaitable[None]]
    _trust_journal: Callable[[], Awaitable[None]]
    _refresh: Callable[[], Awaitable[None]]
    _check_usable: Callable[[], None]
    _now_micros: Callable[[], int]
    _whole: Callable[..., Awaitable[None]]

    async def _owned_documents(self, owner: Owner) -> dict[str, dict[str, Document]]:
        await self._refresh()
        await self._whole()  # lazy collections read whole off the loop first (json/lazy.py)
        # The loop copies the keys only (a list of 100k strings: well under a ms; pairs would cost tuples and tens
        # of ms); matching, reading and decoding run in a thread.
        data = self._tables.data
        keys = {name: list(coll) for name, coll in data.items() if coll}
        return await cancellation.run_in_thread(_decoded, data, keys, self._expired(), owner)  # no I/O to translate

    async def _owned_messages(self, owner: Owner) -> AsyncIterator[Record]:
        root = self.path / MESSAGES_DIR
        for index, record in enumerate(await run_in_thread(owned_records, root, owner)):
            if index and not index % 100:
                await asyncio.sleep(0)
            yield record

    async def _count_owned_messages(self, owner: Owner) -> int:
        return await run_in_thread(count_owned, self.path / MESSAGES_DIR, owner)

    async def _forget(self, owner: Owner) -> tuple[dict[str, int], int]:
        self._check_usable()
        token = forget_files.new_token()
        begun = False  # the intent may exist: from then on its resolution cleans the work folder up
        try:
            # The slow part (read every message file, write and fsync the staged ones: seconds at 1M messages)
            # runs before the lock, so writers do not wait for it; under the lock only what changed meanwhile is
            # read again (forget_files.restage).
            plan = await run_in_thread(forget_files.stage, self.path, owner, token)
            async with self._locked():
                await self._trust_journal()
                # Under the lock nothing changes the documents on the loop: the thread may read them as they are.
                await run_in_thread(forget_files.restage, plan, self._tables.data, owner)
                if plan.empty:
                    return {}, 0
                begun = True
                try:
                    await run_in_thread(forget_files.begin, plan)
                except BaseException:
                    # nothing committed: put the files back (if that fails too, the intent stays and the next
                    # lock or open rolls back), then report the first failure
                    plan.settled = bool(await cancellation.run_to_completion(self._settle(roll_back=True)))
                    raise
                # From the intent on, the forget runs to its end even if the caller is cancelled: the journal
                # commit decides, and the files follow it.
                dead = self._expired()  # removed too (their bytes are the user's data), never counted: absent
                await cancellation.run_to_completion(self._commit_forget(plan))
        finally:
            # No intent was written, or it is resolved: the work folder is garbage (also when cancelled). Its old
            # files (at 1M messages, most of the log) are deleted after the lock: writers need not wait for that.
            if not begun or plan.settled:
                await cancellation.run_to_completion(asyncio.to_thread(forget_files.discard, self.path, token))
        counts = {name: len(set(keys) - dead.get(name, set())) for name, keys in plan.keys.items()}
        return {name: n for name, n in counts.items() if n}, plan.messages

    def _expired(self) -> dict[str, set[str]]:
        """The keys of expired documents still held, per collection (json/expiry.py; usually none)."""
        now = self._now_micros()
        return {name: dead for name, expiring in self._tables.expires.items() if (dead := dead_keys(expiring, now))}

    async def _commit_forget(self, plan: forget_files.ForgetPlan) -> None:
        ops: list[Op] = [("d", name, key) for name, keys in plan.keys.items() for key in keys]
        try:
            if ops:
                await self._commit(ops)
        finally:
            # decided by the documents: forward if committed, else back
            plan.settled = bool(await self._settle(roll_back=False))

    async def _undo_begin(self, discard: Callable[[], None]) -> None:
        """:func:`forget_files.begin` failed, nothing committed: roll back its intent if it was written, then
        remove the work folder (nothing refers to it any more)."""
        if forget_files.pending(self.path):
            await self._settle(roll_back=True)  # if that fails, the work folder stays: the rollback needs it
        await self._discard_unless_pending(discard)

    async def _discard_unless_pending(self, discard: Callable[[], None]) -> None:
        """Remove a transaction's work folder, never while an intent may still refer to it (a resolution that
        failed, or did not happen: the next lock or open needs the files moved aside)."""
        if not forget_files.pending(self.path):
            await cancellation.run_in_thread(discard)

    async def _settle(self, *, roll_back: bool) -> bool:
        """Resolve this forget's intent (see :func:`forget_files.resolve`; True once resolved); an error there
        leaves it pending. The work folder is left for the caller to delete after the lock."""
        data: Mapping[str, Mapping[str, bytes]] = self._tables.data
        await run_in_thread(functools.partial(forget_files.resolve, roll_back=roll_back, remove_work=False),
                            self.path, data, self._journal.holds)
        return True

    async def _commit_transaction(self, ops: list[Op], messages: TxMessages) -> None:
        """Commit a transaction that staged message work (json/tx_messages.py), under its lock: the staged files
        made durable, the intent naming the journal record that decides, the swap, the record, the resolution.

        Before the intent, a failure or cancellation discards the staging (nothing committed); from the intent on,
        the commit runs to its end even if the caller is cancelled, and the journal record decides."""
        try:
            # a large record is encoded and digested in a worker thread (5 MB of deletions: ~20 ms of CPU)
            record, digest = await cancellation.run_in_thread(_encoded, ops) if len(ops) > LARGE_RECORD \
                else _encoded(ops)
            journal = self._journal
            commit = {"generation": journal.generation, "offset": journal.offset, "length": len(record),
                      "digest": digest}
            plan = await run_in_thread(messages.finish, commit)
        except BaseException:
            await cancellation.run_in_thread(messages.discard)
            raise
        try:
            await run_in_thread(forget_files.begin, plan)
        except BaseException:
            await cancellation.run_to_completion(self._undo_begin(messages.discard))
            raise
        await cancellation.run_to_completion(self._commit_record(ops, record, messages))

    async def _commit_record(self, ops: list[Op], record: bytes, messages: TxMessages) -> None:
        try:
            await self._commit(ops, record=record)
        finally:
            await self._settle(roll_back=False)  # decided by the journal: forward if the record is there, else back
            await self._discard_unless_pending(messages.discard)  # resolved: the work folder is garbage


    async def _commit_restore(self, ops: list[Op], swap: json_restore.RestoreSwap) -> None:
        """Commit a restore's transaction (json/restore.py), under its lock: the intent naming the journal record
        that decides (a record is written even when ``ops`` is empty: the messages still change), the swap of the
        message folders, the record, the resolution.

        Before the intent, a failure or cancellation leaves nothing to undo (the restorer's ``finish`` deletes the
        staged folder); from the intent on, the commit runs to its end even if the caller is cancelled, and the
        journal record decides."""
        record, digest = await cancellation.run_in_thread(_encoded, ops) if len(ops) > LARGE_RECORD \
            else _encoded(ops)
        journal = self._journal
        commit = {"generation": journal.generation, "offset": journal.offset, "length": len(record),
                  "digest": digest}
        try:
            await run_in_thread(swap.write_intent, commit)
        except BaseException:
            await cancellation.run_to_completion(self._settle_restore(roll_back=True))
            raise
        await cancellation.run_to_completion(self._commit_restore_record(ops, record))

    async def _commit_restore_record(self, ops: list[Op], record: bytes) -> None:
        try:
            await self._commit(ops, record=record)
        finally:
            await self._settle_restore(roll_back=False)  # the journal decides: forward if the record is there

    async def _settle_restore(self, *, roll_back: bool) -> None:
        """Resolve the restore's intent now; if that fails, it stays pending (the restorer's ``finish``, and every
        later lock or open, resolve it the same way, by the journal) and the first error is the one reported."""
        if not json_restore.pending(self.path):
            return
        data: Mapping[str, Mapping[str, bytes]] = self._tables.data
        try:
            await cancellation.run_in_thread(functools.partial(json_restore.resolve, roll_back=roll_back),
                                              self.path, data, self._journal.holds)
        except OSError as exc:
            log.warning("%s: could not resolve the restore's intent yet (%s): the next lock or open does", self.path,
                        exc)


class JsonTxLifecycle:
    """The lifecycle primitives of a :class:`storage.backends.json.transaction.JsonTransaction` (whose attributes are
    declared below): documents from the transaction's staged view, message records from its staged message work
    (:mod:`.tx_messages`), both read-your-writes; a forget stages the deletions of the owner's documents with the
    rest of the transaction."""

    _json: Any  # the JsonBackend (a JsonLifecycle)
    _staged: Staged
    _stage: Callable[[list[Op]], Awaitable[None]]
    _tx_messages: TxMessages
    _steps: asyncio.Lock  # one message step at a time: each reads the view the one before left

    def _tx_now(self) -> int:
        now: int = self._json._now_micros()
        return now

    async def _committed_keys(self, owner: Owner) -> dict[str, list[str]]:
        """The owner's committed keys (visible or not) per collection: the loop copies the keys (as the store's
        ``_owned_documents`` does: a read-only store's transaction holds no file lock, so the documents may move
        on meanwhile), a worker thread matches them."""
        await self._json._whole()  # lazy collections read whole off the loop first (json/lazy.py)
        keys = {name: list(coll) for name, coll in self._json._tables.data.items() if coll}
        return await cancellation.run_in_thread(_owned_in, keys, owner)

    async def _tx_owned_keys(self, owner: Owner) -> dict[str, set[str]]:
        """The owner's keys (visible or not) per collection as this transaction sees them: the committed ones,
        then this transaction's own changes, applied on the loop after the last await (so nothing it stages
        meanwhile is missed)."""
        return self._with_changes(await self._committed_keys(owner), owner)

    def _with_changes(self, base: dict[str, list[str]], owner: Owner) -> dict[str, set[str]]:
        keys = {name: set(found) for name, found in base.items()}
        owns = owner.owns_key
        for collection, mine in self._staged.changes.items():
            for key, value in mine.items():
                if owns(key):
                    if value is None:
                        keys.get(collection, set()).discard(key)
                    else:
                        keys.setdefault(collection, set()).add(key)
        return {name: found for name, found in keys.items() if found}

    def _sorted_with_changes(self, base: dict[str, list[str]], owner: Owner) -> dict[str, list[str]]:
        """:meth:`_with_changes` as sorted lists: a collection this transaction changed no owned key of keeps the
        list ``base`` holds (sorted in the worker thread already; the usual forget re-sorts nothing on the loop)."""
        touched: dict[str, dict[str, bool]] = {}  # collection -> {owned key this transaction changed: now present}
        owns = owner.owns_key
        for collection, mine in self._staged.changes.items():
            for key, value in mine.items():
                if owns(key):
                    touched.setdefault(collection, {})[key] = value is not None
        out = {name: found for name, found in base.items() if name not in touched}
        for name, changed in touched.items():
            merged = set(base.get(name, ()))
            merged.difference_update(key for key, present in changed.items() if not present)
            merged.update(key for key, present in changed.items() if present)
            if merged:
                out[name] = sorted(merged)
        return {name: out[name] for name in sorted(out)}

    async def _owned_documents(self, owner: Owner) -> dict[str, dict[str, Document]]:
        keys = await self._tx_owned_keys(owner)
        staged, now, loads = self._staged, self._tx_now(), orjson.loads
        out: dict[str, dict[str, Document]] = {}
        for name in sorted(keys):
            found = {}
            for key in sorted(keys[name]):
                raw = staged.live(name, key, now)
                if raw is not None:
                    found[key] = loads(raw)
            if found:
                out[name] = found
        return out

    async def _owned_messages(self, owner: Owner) -> AsyncIterator[Record]:
        view = self._tx_messages.view()
        for index, record in enumerate(await run_in_thread(records_in, _view_files(view, owner), owner)):
            if index and not index % 100:
                await asyncio.sleep(0)
            yield record

    async def _count_owned_messages(self, owner: Owner) -> int:
        view = self._tx_messages.view()
        return await run_in_thread(lambda: count_in(_view_files(view, owner), owner))

    async def _step(self, work: Callable[[View, Path], Step]) -> Step:
        """Run one message step (a prune) in a worker thread over this transaction's view, and adopt it once it
        finished (a failure or a cancellation before then leaves the transaction as it was)."""
        self._json._check_usable()
        async with self._steps:
            view, folder = self._tx_messages.view(), self._tx_messages.next_folder()
            step = await run_in_thread(work, view, folder)
            self._tx_messages.adopt(step)
            return step

    async def _forget(self, owner: Owner) -> tuple[dict[str, int], int]:
        self._json._check_usable()
        base = await self._committed_keys(owner)
        async with self._steps:
            view, folder = self._tx_messages.view(), self._tx_messages.next_folder()
            step = await run_in_thread(forget_step, view, folder, owner)
            # From here to the staging, no await: the message side and the documents become part of the
            # transaction together (a cancellation before this point leaves neither).
            keys = self._sorted_with_changes(base, owner)
            now = self._tx_now()
            # every key in ``keys`` is present in the view: only the expired ones (json/expiry.py) are not counted
            counts: dict[str, int] = {}
            for name, found in keys.items():
                dead = dead_keys(self._staged.expiring_in(name), now)
                if n := (len(found) - len(dead.intersection(found)) if dead else len(found)):
                    counts[name] = n
            self._tx_messages.adopt(step)
            # expired documents are removed too (their bytes are the user's data), but not counted: absent already
            await cancellation.run_to_completion(self._stage_deletes(keys))
        return counts, step.removed

    async def _stage_deletes(self, keys: dict[str, list[str]]) -> None:
        """Stage the deletion of ``keys`` STAGE_TURN at a time, a loop turn between (the first slice before any
        await). Run to completion: a cancellation meanwhile is delivered once every deletion is staged, so the
        forget stays whole with its message side (a 20k-member guild staged at once held the loop ~30 ms)."""
        first = True
        for name, found in keys.items():
            for start in range(0, len(found), STAGE_TURN):
                if not first:
                    await asyncio.sleep(0)
                first = False
                await self._stage([("d", name, key) for key in found[start:start + STAGE_TURN]])

    async def _delete_messages_before(self, before: datetime, guild: str | None = None) -> int:
        bound = bound_key(before)
        step = await self._step(lambda view, folder: prune_step(view, folder, bound, guild))
        return step.removed
