"""The JSON backend's lifecycle primitives (:class:`storage.interfaces.Backend`): what an owner owns, and forgetting
it all or nothing (the protocol: :mod:`.forget_files`).

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
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import orjson

from ... import cancellation
from ...ownership import Owner
from ...protocol import Document
from . import forget_files
from .expiry import dead_keys
from .journal import Op
from .message_files import MESSAGES_DIR, corrupt, list_files, order, parse_line, run_in_thread
from .messages import MessageLog
from .tables import Tables

__all__ = ["JsonLifecycle", "owned_records", "count_owned"]

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


def _files(root: Path, owner: Owner) -> list[tuple[str, Path]]:
    return [(guild, path) for (guild, _month), path, _st in list_files(root)
            if owner.guild is None or guild == owner.guild]


def owned_records(root: Path, owner: Owner) -> list[Record]:
    """Every record the owner owns (current versions: the last line of an id in its file), by (timestamp, id).

    A user's records are found with bytes searches (:func:`forget_files.lines_with`) before anything is parsed."""
    parts: list[list[Record]] = []
    needle = None if owner.user is None else b'"' + owner.user.encode() + b'"'
    for _guild, path in _files(root, owner):
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
    """How many records the owner owns (a guild's: the distinct ids of its files, without parsing them)."""
    if owner.user is not None:
        return len(owned_records(root, owner))
    total = 0
    for _guild, path in _files(root, owner):
        try:
            total += len(forget_files.file_ids(path, path.read_bytes()))
        except FileNotFoundError:
            continue
    return total


class JsonLifecycle:
    """Mixed into :class:`storage.backends.json.store.JsonBackend` (whose attributes are declared below)."""

    path: Path
    _tables: Tables
    _messages: MessageLog
    _locked: Callable[[], AbstractAsyncContextManager[None]]
    _commit: Callable[[list[Op]], Awaitable[None]]
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
        async with self._locked():
            await self._trust_journal()
            # Under the lock nothing changes the documents on the loop: the thread may read them as they are.
            plan = await run_in_thread(forget_files.prepare, self.path, self._tables.data, owner)
            if plan.empty:
                plan.discard()
                return {}, 0
            try:
                await run_in_thread(forget_files.begin, plan)
            except BaseException:
                # nothing committed: put the files back (if that fails too, the intent stays and the next lock
                # or open rolls back), then report the first failure
                await cancellation.run_to_completion(self._settle(roll_back=True))
                raise
            # From the intent on, the forget runs to its end even if the caller is cancelled: the journal commit
            # decides, and the files follow it.
            dead = self._expired()  # removed too (their bytes are the user's data), but never counted: absent already
            await cancellation.run_to_completion(self._commit_forget(plan))
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
            await self._settle(roll_back=False)  # decided by the documents: forward if committed, else back

    async def _settle(self, *, roll_back: bool) -> None:
        """Resolve this forget's intent (see :func:`forget_files.resolve`); an error there leaves it pending."""
        data: Mapping[str, Mapping[str, bytes]] = self._tables.data
        await run_in_thread(functools.partial(forget_files.resolve, roll_back=roll_back), self.path, data)
