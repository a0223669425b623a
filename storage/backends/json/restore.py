"""A JSON store's restore, all or nothing across documents and messages, also across a crash (``kill -9``).

The documents of a JSON store commit with one journal record (atomic), but its messages live in their own files
(``messages/<guild>/<month>.jsonl``), outside that record. Replacing the messages after the documents committed
left a window in which a crash kept the documents restored and the message log half-written or empty, with
nothing to say so. The restore therefore runs like a database's intent log:

1. **Stage** (before the store lock is taken; the slow part): the backup's messages are written, fsynced, into a
   fresh folder ``messages.restore-<pid>-<hex>`` next to ``messages/``, in the message log's own format, with a
   fresh ``rewrites.generation`` so every process's message index and column cache are rebuilt after the swap.
2. **Intent** (inside the documents' transaction, after its changes are staged): ``storage.restore`` is written
   and fsynced. It records the content digest of the documents *before* the restore.
3. **Swap**: ``messages/`` is renamed aside (``messages.replaced-<token>``) and the staged folder takes its place.
4. **Commit**: the transaction appends its journal record. This is the one point that decides the outcome.
5. **Finish**: the intent is resolved (below) and removed; the replaced folder is deleted.

Resolving an intent (:func:`resolve`), under the store lock, with the documents loaded: if the documents' digest
still equals the recorded "before" digest, the commit did not happen, so the messages are rolled back (the
replaced folder returns); otherwise the commit happened and the restore is rolled forward (the staged folder
is, or becomes, ``messages/``). A restore that changes no document has equal digests before and after: it is
rolled back, which is also a correct outcome (the pre-restore state). Every step is a rename or an unlink
followed by a directory fsync, and each is redone safely if a crash interrupts the resolution itself.

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
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import orjson

from ...errors import CorruptDataError, DatabaseError
from ...fsutil import atomic_write, fsync_dir, pid_alive
from ...interfaces import MessageSwap
from .message_files import GENERATION_NAME, MESSAGES_DIR, run_in_thread

__all__ = [
    "INTENT_NAME", "RestoreSwap", "documents_digest", "stage_messages", "begin", "resolve", "recover", "discard",
    "pending", "intent_path", "intent_pending", "sweep", "is_restore_entry",
]

log = logging.getLogger("storage.json.restore")

INTENT_NAME = "storage.restore"
_STAGED = MESSAGES_DIR + ".restore-"
_REPLACED = MESSAGES_DIR + ".replaced-"
_DISCARD = MESSAGES_DIR + ".discard-"
_STAGED_RE = re.compile(re.escape(_STAGED) + r"(\d+)-[0-9a-f]{16}\Z")
_ENTRY_RE = re.compile(r"(?:" + "|".join(map(re.escape, (_STAGED, _REPLACED, _DISCARD))) + r")[0-9a-f-]+\Z")


def is_restore_entry(name: str) -> bool:
    """Whether a name in the data folder belongs to a restore in progress (the intent or a message folder)."""
    return name == INTENT_NAME or _ENTRY_RE.match(name) is not None


def documents_digest(data: Mapping[str, Mapping[str, bytes]]) -> str:
    """One sha256 over every non-empty collection's documents, in their canonical form (keys sorted).

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


def stage_messages(data_path: Path, batches: Iterable[list[dict[str, Any]]]) -> tuple[Path, int]:
    """Write the (already checked) records into a new staged folder; returns it and how many records it holds.

    Runs in a thread, no lock needed: nobody else knows the folder. On an error it is removed and the error raised.
    """
    from .messages import MessageLog  # here: json_messages imports nothing from this module, keep it so

    staged = data_path / f"{_STAGED}{os.getpid()}-{secrets.token_hex(8)}"
    staged.mkdir(mode=0o700)
    try:
        log_ = MessageLog(staged, contextlib.asynccontextmanager(_unlocked))
        count = 0
        try:
            for batch in batches:
                count += log_._insert_locked([batch])[0]  # the private folder is ours alone: no lock to take
        finally:
            log_.close()
        atomic_write(staged / GENERATION_NAME, secrets.token_hex(8).encode() + b"\n")
        fsync_dir(staged)
        fsync_dir(data_path)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return staged, count


def begin(data_path: Path, staged: Path, before_digest: str, backup_id: str) -> None:
    """Steps 2 and 3, under the store lock inside the restore's transaction: the intent, then the swap."""
    token = staged.name[len(_STAGED):]
    intent = {"token": token, "backup": backup_id, "before": before_digest}
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


def _read_intent(data_path: Path) -> dict[str, str]:
    path = data_path / INTENT_NAME
    try:
        intent = orjson.loads(path.read_bytes())
        if not (type(intent) is dict and all(type(intent.get(k)) is str for k in ("token", "backup", "before"))
                and re.fullmatch(r"\d+-[0-9a-f]{16}", intent["token"])):
            raise ValueError("not a restore intent")
    except (OSError, ValueError) as exc:
        raise CorruptDataError(f"{path}: an interrupted restore left this file, but it cannot be read ({exc}); "
                               "the store cannot tell which state is current: restore a backup by hand") from exc
    return intent


def resolve(data_path: Path, data: Mapping[str, Mapping[str, bytes]]) -> Path | None:
    """Finish or undo an interrupted restore (see the module doc); needs the store lock and ``data`` caught up.

    Returns the folder left to delete (renamed ``messages.discard-<token>``), or ``None`` when no intent exists.
    """
    if not pending(data_path):
        return None
    intent = _read_intent(data_path)
    token = intent["token"]
    current = data_path / MESSAGES_DIR
    staged = data_path / f"{_STAGED}{token}"
    replaced = data_path / f"{_REPLACED}{token}"
    committed = documents_digest(data) != intent["before"]
    # the restorer's own resolution is routine; another process (or a later open) finishing one is worth a warning
    say = log.info if intent["token"].split("-", 1)[0] == str(os.getpid()) else log.warning
    if committed:
        if staged.exists():  # the swap did not finish: finish it
            if current.exists() and not replaced.exists():
                os.rename(current, replaced)
            os.rename(staged, current)
        garbage = replaced
        say("%s: completing the restore of backup %s (its documents were committed)", data_path, intent["backup"])
    else:
        if replaced.exists():
            if current.exists():
                os.rename(current, staged)
            # a new generation: every process's message index and cache must forget what they saw of the staged log
            atomic_write(replaced / GENERATION_NAME, secrets.token_hex(8).encode() + b"\n")
            os.rename(replaced, current)
        garbage = staged
        say("%s: rolling back the restore of backup %s (its documents were never committed)", data_path,
            intent["backup"])
    discard = data_path / f"{_DISCARD}{token}"
    if garbage.exists():
        os.rename(garbage, discard)
    fsync_dir(data_path)
    os.unlink(data_path / INTENT_NAME)
    fsync_dir(data_path)
    return discard if discard.exists() else None


def recover(data_path: Path, data: Mapping[str, Mapping[str, bytes]], *, at_open: bool = False) -> None:
    """The store's hook: resolve a pending intent (under the lock, ``data`` caught up); at open also :func:`sweep`.

    An ``OSError`` becomes a :class:`DatabaseError` (the intent stays, and the next lock or open tries again).
    """
    try:
        if pending(data_path):
            resolve(data_path, data)
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



class RestoreSwap(MessageSwap):
    """The JSON store's :class:`~storage.interfaces.MessageSwap`: the steps above for one restore.

    ``digest()`` gives the digest of the store's documents as they are (called inside the restore's transaction,
    before its commit); ``locked()`` is the store's lock, whose hook resolves a pending intent.
    """

    def __init__(self, data_path: Path, digest: Callable[[], str],
                 locked: Callable[[], AbstractAsyncContextManager[None]]) -> None:
        self.path = data_path
        self._digest = digest
        self._locked = locked
        self.staged: Path | None = None

    async def stage(self, batches: Iterable[list[dict[str, Any]]]) -> int:
        self.staged, count = await run_in_thread(stage_messages, self.path, batches)
        return count

    async def begin(self, backup_id: str) -> None:
        """Under the transaction's lock, after its changes are staged: write the intent and swap the folders."""
        assert self.staged is not None
        before = await run_in_thread(self._digest)
        await run_in_thread(begin, self.path, self.staged, before, backup_id)

    async def finish(self) -> None:
        """Resolve the intent under the store lock (its hook does it), then delete this restore's leftovers."""
        if self.staged is None:
            return
        try:
            async with self._locked():
                pass  # the store's lock resolves a pending intent as soon as it holds it
        finally:
            await run_in_thread(discard, self.path, self.staged)
