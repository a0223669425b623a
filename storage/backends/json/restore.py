"""A JSON store's restore, all or nothing across documents and messages, also across a crash (``kill -9``).

The documents of a JSON store commit with one journal record (atomic), but its messages live in their own files
(``messages/<guild>/<month>.jsonl``), outside that record. Replacing the messages after the documents committed
left a window in which a crash kept the documents restored and the message log half-written or empty, with
nothing to say so. The restore therefore runs like a database's intent log:

1. **Stage** (before the store lock is taken; the slow part): the backup's messages are written, fsynced, into a
   fresh folder ``messages.restore-<pid>-<hex>`` next to ``messages/``, in the message log's own format, with a
   fresh ``rewrites.generation`` so every process's message index and column cache are rebuilt after the swap.
2. **Intent** (at the transaction's commit, under the store lock; ``JsonLifecycle._commit_restore``): the
   transaction's journal record is encoded first, and ``storage.restore`` names it (``"commit"``: the journal
   generation, the offset it will start at, its length and digest, as a transaction's forget does,
   json/forget_files.py); written and fsynced. The record is written even when the restore changes no document
   (then it holds no operation, ``[]``): the messages still change, and the commit must be a record of its own.
3. **Swap**: ``messages/`` is renamed aside (``messages.replaced-<token>``) and the staged folder takes its place.
4. **Commit**: the transaction appends its journal record. This is the one point that decides the outcome.
5. **Finish**: the intent is resolved (below) and removed; the replaced folder is deleted.

Resolving an intent (:func:`resolve`), under the store lock, with the journal caught up: if the journal holds the
record the intent names (:meth:`storage.backends.json.journal.Journal.holds`), the restore is rolled forward (the
staged folder is, or becomes, ``messages/``); otherwise it is rolled back (the replaced folder returns). Nobody
appends before resolving a pending intent (every lock and every open resolves it first), so the record is where
the intent says if it was committed; a record cut away as never acknowledged, or a journal rewritten from memory
after a failed append (a new generation), means it was not. Every step is a rename or an unlink followed by a
directory fsync, and each is redone safely if a crash interrupts the resolution itself.

Why the record and not the documents: earlier versions recorded the documents' digest *before* the restore and
decided "committed" by a different digest after it. A restore whose backup held the store's current documents
(only the messages differ) changed no document and wrote no record: it was always rolled back, the messages kept,
while its report said they were restored (found in the stall2 review).

Intents in the earlier format (``"before"``: a digest; no ``"commit"``), left by an older version that crashed
mid-restore and was upgraded, are still resolved its way: that version wrote a record only when documents changed,
so a digest that differs means committed, and an equal one means the documents are the same in both states and
the messages roll back (the pre-restore state, as that version itself would have left it): never a mix. Intents
in this format carry ``"before": null``, which the earlier versions refuse ("cannot be read") rather than decide
by a digest (which would roll back a committed restore that changed no document): during a rolling upgrade an
old process stops at such an intent until a new one resolves it (any lock or open of the new version).

Who resolves: the restoring process itself at step 5; :meth:`JsonStore._open_sync` when a store is opened (a
crashed restore never outlives the next open); and the store's lock (``_locked``) whenever it finds the intent
file, so a process that already had the store open never writes on top of a half-finished restore. Garbage
folders (``messages.discard-<token>``, staged folders of dead processes) are deleted at open and by the restorer.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import secrets
import shutil
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import orjson

from ...errors import CorruptDataError, DatabaseError
from ...fsutil import atomic_write, fsync_dir, pid_alive
from ...interfaces import BackendTransaction, MessageSwap
from .message_files import GENERATION_NAME, MESSAGES_DIR, run_in_thread

__all__ = [
    "INTENT_NAME", "RestoreSwap", "CommitsRestore", "JournalHolds", "documents_digest", "stage_messages", "begin",
    "resolve", "recover", "discard", "pending", "intent_path", "intent_pending", "sweep", "is_restore_entry",
]

log = logging.getLogger("storage.json.restore")

INTENT_NAME = "storage.restore"
_STAGED = MESSAGES_DIR + ".restore-"
_REPLACED = MESSAGES_DIR + ".replaced-"
_DISCARD = MESSAGES_DIR + ".discard-"
_STAGED_RE = re.compile(re.escape(_STAGED) + r"(\d+)-[0-9a-f]{16}\Z")
_TOKEN_RE = re.compile(r"\d+-[0-9a-f]{16}\Z")
_ENTRY_RE = re.compile(r"(?:" + "|".join(map(re.escape, (_STAGED, _REPLACED, _DISCARD))) + r")[0-9a-f-]+\Z")


#: ``holds(generation, offset, length, digest)``: whether the store's journal (caught up under the lock) committed
#: that record (:meth:`storage.backends.json.journal.Journal.holds`): what decides a restore.
JournalHolds = Callable[[int, int, int, str], bool]


def is_restore_entry(name: str) -> bool:
    """Whether a name in the data folder belongs to a restore in progress (the intent or a message folder)."""
    return name == INTENT_NAME or _ENTRY_RE.match(name) is not None


def documents_digest(data: Mapping[str, Mapping[str, bytes]]) -> str:
    """One sha256 over every non-empty collection's documents, in their canonical form (keys sorted): what decides
    an intent in the earlier format (see the module doc; 0.22 s of CPU at 100k members here, which a restore no
    longer spends under the lock).

    Canonical, so two loads of the same documents give the same digest whatever their key order on disk.
    """
    h = hashlib.sha256()
    loads, dumps, sort = orjson.loads, orjson.dumps, orjson.OPT_SORT_KEYS
    for name in sorted(data):
        coll = data[name]
        if not coll:
            continue
        h.update(b"\x01%s\x00" % name.encode())
        for key in sorted(coll):
            h.update(b"%s\x00%s\x00" % (key.encode(), dumps(loads(coll[key]), option=sort)))
    return h.hexdigest()


async def _unlocked() -> AsyncIterator[None]:
    yield


#: Records per append (one write and fsync per file) when staging: the batches that come in are small (decoded
#: a few dozen at a time, so that they die young: ``backup.messages.DECODE_GROUP``), so several make one append;
#: only their encoded lines are held meanwhile.
STAGE_COMMIT = 2000


def commit_groups(batches: Iterable[list[Any]], records: int) -> Iterator[Iterator[list[Any]]]:
    """``batches`` in consecutive runs of at least ``records`` records (the last one shorter), each run a lazy
    iterator over the batches themselves; each run must be consumed before the next is asked for."""
    it = iter(batches)
    for first in it:
        def run(first: list[Any] = first) -> Iterator[list[Any]]:
            n = len(first)
            yield first
            while n < records:
                batch = next(it, None)
                if batch is None:
                    return
                n += len(batch)
                yield batch
        yield run()


def stage_messages(data_path: Path, batches: Iterable[list[dict[str, Any]]]) -> tuple[Path, int]:
    """Write the (already checked) records into a new staged folder; returns it and how many records it holds.

    Runs in a thread, no lock needed: nobody else knows the folder. On an error it is removed and the error raised.
    The batches are appended STAGE_COMMIT records at a time, each decoded batch encoded as soon as it comes.
    """
    from .messages import MessageLog  # here: json_messages imports nothing from this module, keep it so

    staged = data_path / f"{_STAGED}{os.getpid()}-{secrets.token_hex(8)}"
    staged.mkdir(mode=0o700)
    try:
        log_ = MessageLog(staged, contextlib.asynccontextmanager(_unlocked))
        count = 0
        try:
            for run in commit_groups(batches, STAGE_COMMIT):
                count += sum(log_._insert_locked(run))  # the private folder is ours alone: no lock to take
        finally:
            log_.free()  # in this worker thread, a piece at a time
        atomic_write(staged / GENERATION_NAME, secrets.token_hex(8).encode() + b"\n")
        fsync_dir(staged)
        fsync_dir(data_path)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return staged, count


def begin(data_path: Path, staged: Path, backup_id: str, commit: Mapping[str, Any]) -> None:
    """Steps 2 and 3, under the store lock at the restore's commit: the intent naming the journal record ``commit``
    (generation, offset, length, digest), then the swap."""
    token = staged.name[len(_STAGED):]
    # "before": null makes an earlier version (which decides by a digest of the documents) refuse the intent
    intent = {"token": token, "backup": backup_id, "commit": dict(commit), "before": None}
    atomic_write(data_path / INTENT_NAME, orjson.dumps(intent) + b"\n")
    fsync_dir(data_path)
    current = data_path / MESSAGES_DIR
    if not current.exists():
        current.mkdir(mode=0o700)  # an empty log to roll back to: the rename below then always has a source
    os.rename(current, data_path / f"{_REPLACED}{token}")
    os.rename(staged, current)
    fsync_dir(data_path)


def pending(data_path: Path) -> bool:
    """Whether a restore's intent is waiting to be resolved (one ``stat``)."""
    return os.path.lexists(data_path / INTENT_NAME)


def intent_path(data_path: Path) -> str:
    """Where the intent would be, for :func:`intent_pending` (a store computes it once)."""
    return os.fspath(data_path / INTENT_NAME)


def intent_pending(intent: str) -> bool:
    """:func:`pending` given :func:`intent_path`: one ``lstat`` and no path join (checked at every lock)."""
    return os.path.lexists(intent)


_Intent = tuple[str, str, "tuple[int, int, int, str] | None", "str | None"]


def _read_intent(data_path: Path) -> _Intent:
    """``(token, backup, commit, before)``: ``commit`` names the deciding journal record (this format), ``before``
    the documents' digest (the earlier format); exactly one of them is set."""
    path = data_path / INTENT_NAME
    try:
        intent = orjson.loads(path.read_bytes())
        if type(intent) is not dict:
            raise ValueError("not a restore intent")
        token, backup, raw, before = intent.get("token"), intent.get("backup"), intent.get("commit"), \
            intent.get("before")
        if type(token) is not str or not _TOKEN_RE.match(token) or type(backup) is not str:
            raise ValueError("not a restore intent")
        commit = None
        if raw is not None:
            if type(raw) is not dict or before is not None:
                raise ValueError(f"bad commit {raw!r:.80}")
            commit = (raw["generation"], raw["offset"], raw["length"], raw["digest"])
            if any(type(v) is not int or v < 0 for v in commit[:3]) or type(commit[3]) is not str:
                raise ValueError(f"bad commit {raw!r:.80}")
        elif type(before) is not str:
            raise ValueError("neither a commit record nor a digest of the documents")
    except (OSError, ValueError, KeyError) as exc:
        raise CorruptDataError(f"{path}: an interrupted restore left this file, but it cannot be read ({exc}); "
                               "the store cannot tell which state is current: restore a backup by hand") from exc
    return token, backup, commit, before


def resolve(data_path: Path, data: Mapping[str, Mapping[str, bytes]], holds: JournalHolds, *,
            roll_back: bool = False) -> Path | None:
    """Finish or undo an interrupted restore (see the module doc); needs the store lock and the journal (``holds``)
    caught up; ``data`` (the documents, caught up) decides only an intent in the earlier format. ``roll_back``: the
    restoring process knows its record was never written (it failed before the commit).

    Returns the folder left to delete (renamed ``messages.discard-<token>``), or ``None`` when no intent exists.
    """
    if not pending(data_path):
        return None
    token, backup, commit, before = _read_intent(data_path)
    current = data_path / MESSAGES_DIR
    staged = data_path / f"{_STAGED}{token}"
    replaced = data_path / f"{_REPLACED}{token}"
    if roll_back:
        committed = False
    elif commit is not None:
        committed = holds(*commit)
    else:  # the earlier format (an older version crashed mid-restore): its own rule, see the module doc
        committed = documents_digest(data) != before
    # the restorer's own resolution is routine; another process (or a later open) finishing one is worth a warning
    say = log.info if token.split("-", 1)[0] == str(os.getpid()) else log.warning
    if committed:
        if staged.exists():  # the swap did not finish: finish it
            if current.exists() and not replaced.exists():
                os.rename(current, replaced)
            os.rename(staged, current)
        garbage = replaced
        say("%s: completing the restore of backup %s (its journal record was committed)", data_path, backup)
    else:
        if replaced.exists():
            if current.exists():
                os.rename(current, staged)
            # a new generation: every process's message index and cache must forget what they saw of the staged log
            atomic_write(replaced / GENERATION_NAME, secrets.token_hex(8).encode() + b"\n")
            os.rename(replaced, current)
        garbage = staged
        say("%s: rolling back the restore of backup %s (its journal record was never committed)", data_path, backup)
    discard = data_path / f"{_DISCARD}{token}"
    if garbage.exists():
        os.rename(garbage, discard)
    fsync_dir(data_path)
    os.unlink(data_path / INTENT_NAME)
    fsync_dir(data_path)
    return discard if discard.exists() else None


def recover(data_path: Path, data: Mapping[str, Mapping[str, bytes]], holds: JournalHolds, *,
            at_open: bool = False) -> None:
    """The store's hook: resolve a pending intent (under the lock, ``data`` caught up); at open also :func:`sweep`.

    An ``OSError`` becomes a :class:`DatabaseError` (the intent stays, and the next lock or open tries again).
    """
    try:
        if pending(data_path):
            resolve(data_path, data, holds)
        if at_open:
            sweep(data_path)
    except OSError as exc:
        raise DatabaseError(f"{data_path}: cannot resolve an interrupted restore ({exc}); it is retried at the "
                            "next write or open") from exc


def discard(data_path: Path, staged: Path) -> None:
    """The restorer's cleanup of its own folders (no lock needed: the names are unique to this restore)."""
    token = staged.name[len(_STAGED):]
    for path in (staged, data_path / f"{_DISCARD}{token}"):
        shutil.rmtree(path, ignore_errors=True)


def sweep(data_path: Path) -> None:
    """Delete what finished or abandoned restores left: discarded and replaced folders, and staged folders of dead
    processes (a live process may still be staging: its folder is kept). Needs the store lock (a restore begins
    under it), and does nothing while an intent is pending.
    """
    if pending(data_path):
        return
    for entry in os.scandir(data_path):
        if not entry.is_dir(follow_symlinks=False):
            continue
        staged = _STAGED_RE.match(entry.name)
        if entry.name.startswith((_DISCARD, _REPLACED)) or (staged and not pid_alive(int(staged.group(1)))):
            log.info("%s: removing %s left by a restore", data_path, entry.name)
            shutil.rmtree(entry.path, ignore_errors=True)



@runtime_checkable
class CommitsRestore(Protocol):
    """A transaction that commits a restore's message swap with its own journal record (a JSON transaction)."""

    def commit_restore(self, swap: RestoreSwap) -> None: ...


class RestoreSwap(MessageSwap):
    """The JSON store's :class:`~storage.interfaces.MessageSwap`: the steps above for one restore.

    ``begin`` hands this swap to the restore's transaction, whose commit writes the intent naming its journal record
    (:meth:`write_intent`, step 2), swaps and commits; ``locked()`` is the store's lock, whose hook resolves a pending
    intent.
    """

    def __init__(self, data_path: Path, locked: Callable[[], AbstractAsyncContextManager[None]]) -> None:
        self.path = data_path
        self._locked = locked
        self.staged: Path | None = None
        self.backup_id = ""

    async def stage(self, batches: Iterable[list[dict[str, Any]]]) -> int:
        self.staged, count = await run_in_thread(stage_messages, self.path, batches)
        return count

    async def begin(self, tx: BackendTransaction, backup_id: str) -> None:
        """The transaction's last step: its commit will write the intent, swap the folders and commit both."""
        assert self.staged is not None
        if not isinstance(tx, CommitsRestore):
            raise TypeError(f"{type(tx).__name__} cannot commit a JSON restore's messages")
        self.backup_id = backup_id
        tx.commit_restore(self)

    def write_intent(self, commit: Mapping[str, Any]) -> None:
        """Steps 2 and 3 (in a worker thread, under the lock, at the commit): ``commit`` names the journal record."""
        assert self.staged is not None
        begin(self.path, self.staged, self.backup_id, commit)

    async def finish(self) -> None:
        """Resolve the intent under the store lock (its hook does it), then delete this restore's leftovers."""
        if self.staged is None:
            return
        try:
            async with self._locked():
                pass  # the store's lock resolves a pending intent as soon as it holds it
        finally:
            await run_in_thread(discard, self.path, self.staged)
