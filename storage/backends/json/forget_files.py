"""A JSON store's ``forget_*``: documents and message files removed all or nothing, also across a crash.

The documents commit with one journal record, but the messages live in their own files
(``messages/<guild>/<month>.jsonl``), outside it. A forget therefore runs like the restore
(:mod:`.restore`), with an intent file, but with the *documents* as the deciding side:

1. **Stage** (:func:`stage`, in a worker thread, *before* the store lock: reading every message file and writing
   and fsyncing the staged ones takes seconds at a million messages, and writers would wait that long): every
   message file that holds records of the owner is read, and the file without them is written, fsynced, into a
   private work folder ``storage.forget-<token>/new/<guild>/<month>.jsonl`` (nothing is staged for a file that
   loses every line, nor for a guild folder that goes as a whole). Each file's identity (inode, size,
   modification time) is noted with what was read of it.
   **Plan** (:func:`restage`, under the lock): the keys to delete are listed, and every file that changed since
   it was read (another writer appended to it, a prune replaced or removed it, a new month began), or whose staged
   version is missing (an open by another process swept the work folder), is read and staged again. Files only
   grow or are replaced under the lock, so a file whose identity is unchanged holds exactly the bytes read.
2. **Intent**: ``storage.forget`` is written and fsynced: the token, the keys, the files and guild folders.
3. **Swap**: the message log's generation changes (every process's index and column cache are rebuilt), each
   file moves aside into ``storage.forget-<token>/old/`` and its staged version takes its place; a forgotten
   guild's whole folder moves to ``storage.forget-<token>/guilds/``. The folders are fsynced.
4. **Commit**: the deletions of the documents are appended to the journal: the one point that decides.
5. **Resolve** (:func:`resolve`): if none of the keys is left in the documents (or there were none), the forget
   happened, and it is rolled forward (a swap that a crash interrupted is finished); otherwise it is rolled back
   (the files moved aside return). The intent is removed, then the work folder: by the forgetting process once
   it released the lock (at 1M messages the folder holds most of the log's old files: about a second of unlinking
   that writers need not wait for), or at once by whoever else resolves it.

**In a transaction** (``tx.forget_user``, ``tx.prune_messages``...; :mod:`.tx_messages`), the deciding side is
the transaction's own journal record instead: its documents may be written again after the forget in the same
transaction (a key forgotten, then put), or it may remove message records only, so "none of the keys is left"
would not tell. Its intent names the record instead (``"commit"``: the journal generation, the offset it starts
at, its length and digest; its ``"keys"`` are ``null``, which versions that decide by the keys refuse rather than
misread): the forget happened if and only if the journal committed exactly that record there.
Under the lock nobody else appends, and nobody compacts before resolving a pending intent, so the record is found
where the intent says if it was committed; a record cut away as never acknowledged, or a journal rewritten from
memory after a failed append (a new generation), means it was not.

Who resolves: the forgetting process itself at step 5 (or after a failure at any step, when it knows the outcome),
:meth:`JsonStore._open_sync` at every open, and the store's lock whenever it finds the intent (like a restore's),
so nobody writes on top of a half-done forget. Work folders without an intent are garbage, removed at open.

Whose data is what: :class:`storage.ownership.Owner`. A line is looked at only if it holds the user's id as a JSON
string (``b'"<id>"'``, a bytes search in C); the others are copied as they are, so a forget costs a read of the
files and a write of those that change, not a parse of every record.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from ...errors import CorruptDataError
from ...fsutil import atomic_write, fsync_dir, write_all
from ...ownership import Owner
from .message_files import GENERATION_NAME, MESSAGES_DIR, block_line_ids, corrupt, list_files, parse_line

__all__ = ["INTENT_NAME", "ForgetPlan", "FileScan", "owned_keys", "new_token", "stage", "restage", "discard", "begin",
           "resolve", "pending", "intent_path", "intent_pending", "recover", "sweep", "file_ids", "lines_with",
           "without_author", "is_forget_entry", "sync_all", "JournalHolds", "WORK_PREFIX"]

log = logging.getLogger("storage.json.forget")

INTENT_NAME = "storage.forget"
_WORK = WORK_PREFIX = "storage.forget-"
_TOKEN = re.compile(r"\d+-[0-9a-f]{16}\Z")
_FSYNC_THREADS = 8


def is_forget_entry(name: str) -> bool:
    """Whether an entry of the data folder belongs to a forget in progress (its intent or work folder)."""
    return name == INTENT_NAME or (name.startswith(_WORK) and _TOKEN.match(name[len(_WORK):]) is not None)


#: A message file's identity when it was read: (inode, size, modification time in ns). Files only grow (appends)
#: or are replaced (a new inode), always under the store lock: the same identity means the same bytes.
Fingerprint = tuple[int, int, int]


@dataclass
class FileScan:
    """What :func:`stage` found in one message file."""

    seen: Fingerprint | None  # None: the file changed while it was read (read again under the lock)
    removed: int  # the owner's records in it (distinct ids)
    staged: int | None  # bytes of its staged version (0: it loses every line; None: nothing of the owner's)


@dataclass
class ForgetPlan:
    """What one forget removes, once planned and staged (see the module doc)."""

    data_path: Path
    token: str
    keys: dict[str, list[str]] = field(default_factory=dict)  # collection -> keys, sorted
    files: list[tuple[str, str, bool]] = field(default_factory=list)  # (guild, month, a staged version exists)
    guilds: list[str] = field(default_factory=list)  # whole guild folders that go
    messages: int = 0  # records removed
    settled: bool = False  # its intent was written and resolved: the work folder is garbage
    scans: dict[tuple[str, str], FileScan] = field(default_factory=dict)  # (guild, month) -> what stage found
    restaged: int = 0  # files read again under the lock (see restage)
    #: A transaction's forget: the journal record that decides it (see the module doc); None: the keys decide.
    commit: dict[str, Any] | None = None

    @property
    def work(self) -> Path:
        return self.data_path / f"{_WORK}{self.token}"

    @property
    def empty(self) -> bool:
        return not (self.keys or self.files or self.guilds)

    def discard(self) -> None:
        """Remove the work folder of a forget that never wrote its intent."""
        discard(self.data_path, self.token)


#: ``holds(generation, offset, length, digest)``: whether the store's journal (caught up under the lock) committed
#: that record (:meth:`storage.backends.json.journal.Journal.holds`): what decides a transaction's forget.
JournalHolds = Callable[[int, int, int, str], bool]


def new_token() -> str:
    """A forget's token: names its work folder (the process id first, for the log of another process)."""
    return f"{os.getpid()}-{secrets.token_hex(8)}"


def discard(data_path: Path, token: str) -> None:
    """Remove the work folder of the forget ``token`` (one that never wrote its intent)."""
    shutil.rmtree(data_path / f"{_WORK}{token}", ignore_errors=True)


def owned_keys(data: Mapping[str, Mapping[str, bytes]], owner: Owner) -> dict[str, list[str]]:
    """The keys ``owner`` owns per collection (only collections with some), sorted. Pure: reads ``data`` only."""
    out: dict[str, list[str]] = {}
    owns = owner.owns_key
    for name in sorted(data):
        keys = sorted(key for key in data[name] if owns(key))
        if keys:
            out[name] = keys
    return out


def file_ids(path: Path, data: bytes) -> set[int]:
    """The distinct message ids of a file's complete lines (a record and its updates are one id)."""
    end = data.rfind(b"\n") + 1
    return set(block_line_ids(path, 0, data[:end])) if end else set()


def lines_with(data: bytes, needle: bytes) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of every complete line of ``data`` that contains ``needle`` (``stop`` is its newline).

    Found with ``bytes.find`` (C): the Python work is per match, not per line, so a worker thread scanning a
    million lines for one user's few holds the GIL (and the event loop) only briefly."""
    end = data.rfind(b"\n") + 1  # an incomplete last line (torn by a crash, never acknowledged) is not one
    pos = data.find(needle, 0, end)
    while pos >= 0:
        start = data.rfind(b"\n", 0, pos) + 1
        stop = data.find(b"\n", pos, end)
        yield start, stop
        pos = data.find(needle, stop + 1, end)


def without_author(path: Path, data: bytes, author: str) -> tuple[bytes, set[int]] | None:
    """A file's complete lines without the author's records: ``(kept bytes, removed ids)``, or None when the file
    holds none of them. Only lines holding the id as a JSON string are parsed; the others are copied as bytes."""
    chunks: list[bytes] = []
    removed: set[int] = set()
    kept_from = 0
    for start, stop in lines_with(data, b'"' + author.encode() + b'"'):
        try:
            rec, _update = parse_line(data[start:stop])
        except ValueError as exc:
            raise corrupt(path, start, exc) from None
        if rec["author_id"] == author:
            removed.add(int(rec["message_id"]))
            chunks.append(data[kept_from:start])
            kept_from = stop + 1
    if not removed:
        return None
    chunks.append(data[kept_from:data.rfind(b"\n") + 1])
    return b"".join(chunks), removed


def _read(path: Path) -> tuple[bytes, Fingerprint | None] | None:
    """A message file's bytes and its identity as read (None as the identity when it changed during the read, so
    that :func:`restage` reads it again; None for everything when the file is gone)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        before = os.fstat(fd)
        data = os.pread(fd, before.st_size, 0) if before.st_size else b""
        after = os.fstat(fd)
    finally:
        os.close(fd)
    seen = (before.st_ino, before.st_size, before.st_mtime_ns)
    stable = len(data) == before.st_size and (after.st_size, after.st_mtime_ns) == seen[1:]
    return data, seen if stable else None


def _fingerprint(st: os.stat_result) -> Fingerprint:
    return st.st_ino, st.st_size, st.st_mtime_ns


def _scan(plan: ForgetPlan, owner: Owner, guild: str, month: str, path: Path) -> FileScan | None:
    """Read one file and stage its version without the owner's records (a user's; a guild's files are only
    counted: its whole folder goes). None when the file is gone."""
    read = _read(path)
    if read is None:
        return None
    data, seen = read
    if owner.user is None:
        return FileScan(seen, len(file_ids(path, data)), None)
    found = without_author(path, data, owner.user)
    if found is None:
        return FileScan(seen, 0, None)
    kept, removed = found
    if kept:
        _stage(plan.work / "new" / guild, f"{month}.jsonl", kept)
    return FileScan(seen, len(removed), len(kept))


def _in_scope(owner: Owner, guild: str) -> bool:
    return owner.guild is None or guild == owner.guild


def stage(data_path: Path, owner: Owner, token: str) -> ForgetPlan:
    """Step 1, in a worker thread *without* the store lock: read the owner's message files and stage them, fsynced
    (see the module doc). The keys and the final list of files are :func:`restage`'s, under the lock. On an error
    the work folder is removed and the error raised (nothing changed)."""
    plan = ForgetPlan(data_path, token)
    root = data_path / MESSAGES_DIR
    try:
        for (guild, month), path, _st in list_files(root):
            if _in_scope(owner, guild):
                scan = _scan(plan, owner, guild, month, path)
                if scan is not None:
                    plan.scans[guild, month] = scan
        sync_all(_staged_paths(plan))
    except BaseException:
        plan.discard()
        raise
    return plan


def _staged_paths(plan: ForgetPlan) -> list[Path]:
    """The staged files and their folders."""
    files = [plan.work / "new" / guild / f"{month}.jsonl" for (guild, month), scan in sorted(plan.scans.items())
             if scan.staged]
    return [*files, *sorted({path.parent for path in files})]


def _staged_intact(plan: ForgetPlan, guild: str, month: str, scan: FileScan) -> bool:
    """Whether the staged version :func:`stage` wrote is there, whole (another process's open sweeps work folders
    that no intent names: it may have removed it since)."""
    if not scan.staged:
        return True
    try:
        return os.stat(plan.work / "new" / guild / f"{month}.jsonl").st_size == scan.staged
    except FileNotFoundError:
        return False


def restage(plan: ForgetPlan, data: Mapping[str, Mapping[str, bytes]], owner: Owner) -> None:
    """Step 1's end, in a worker thread under the store lock (nothing changes the files or ``data`` meanwhile):
    the keys to delete; every message file that is new, changed or gone since :func:`stage` read it is read and
    staged again (or dropped); then the plan's files, guild folders and count. On an error the work folder is
    removed and the error raised (nothing changed)."""
    plan.keys = owned_keys(data, owner)
    root = plan.data_path / MESSAGES_DIR
    try:
        scans: dict[tuple[str, str], FileScan] = {}
        fresh: list[Path] = []
        for (guild, month), path, st in list_files(root):
            if not _in_scope(owner, guild):
                continue
            scan = plan.scans.get((guild, month))
            if scan is None or scan.seen != _fingerprint(st) or not _staged_intact(plan, guild, month, scan):
                staged = plan.work / "new" / guild / f"{month}.jsonl"
                staged.unlink(missing_ok=True)
                scan = _scan(plan, owner, guild, month, path)
                plan.restaged += 1
                if scan is None:
                    continue
                if scan.staged:
                    fresh.append(staged)
            scans[guild, month] = scan
        for (guild, month), scan in plan.scans.items():  # files gone since (pruned): their staged versions too
            if (guild, month) not in scans and scan.staged:
                (plan.work / "new" / guild / f"{month}.jsonl").unlink(missing_ok=True)
        plan.scans = scans
        if owner.user is None:  # a guild: its whole folder
            assert owner.guild is not None
            if (root / owner.guild).is_dir():
                plan.guilds.append(owner.guild)
                plan.messages = sum(scan.removed for scan in scans.values())
        else:
            for (guild, month), scan in sorted(scans.items()):
                if scan.removed:
                    plan.files.append((guild, month, bool(scan.staged)))
                    plan.messages += scan.removed
        if plan.files or plan.guilds:
            (plan.work / "old").mkdir(parents=True, exist_ok=True)
            (plan.work / "guilds").mkdir(exist_ok=True)
            if fresh:  # the files staged again, and every staged folder (a sweep may have recreated one)
                sync_all([*fresh, *sorted({path.parent for path in _staged_paths(plan)})])
    except BaseException:
        plan.discard()
        raise


def _stage(folder: Path, name: str, content: bytes) -> Path:
    """Write a staged file (fsynced later, with the others: :func:`sync_all`)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        write_all(fd, content)
    finally:
        os.close(fd)
    return path


def sync_all(paths: list[Path]) -> None:
    """fsync files and folders, several at a time: a user active in 100 guilds for a year has over a thousand
    files staged, and parallel fsyncs let the disk merge the flushes (about 3x faster, see json/messages.py)."""
    def sync(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    if len(paths) <= 2:
        for path in paths:
            sync(path)
        return
    with concurrent.futures.ThreadPoolExecutor(_FSYNC_THREADS, thread_name_prefix="storage-forget-fsync") as pool:
        for future in [pool.submit(sync, path) for path in paths]:
            future.result()


def begin(plan: ForgetPlan) -> None:
    """Steps 2 and 3, under the store lock: the intent, then the swap of the message files."""
    # the pairs as tuples (the same JSON arrays): a list each, a 20k-member guild's 20k lists reached the
    # collector's oldest generation while the others were built (half of what set off a full collection there)
    intent: dict[str, Any] = {"token": plan.token, "keys": [(c, k) for c, keys in plan.keys.items() for k in keys],
                              "files": plan.files, "guilds": plan.guilds}
    if plan.commit is not None:
        # decided by the record, not the keys; and ``"keys": null`` makes a version from before transactions could
        # forget (which would decide by the keys, and find none) refuse the intent instead of guessing
        intent["commit"], intent["keys"] = plan.commit, None
    if plan.work.exists():
        fsync_dir(plan.data_path)  # the work folder's entry, before the intent names it
    atomic_write(plan.data_path / INTENT_NAME, orjson.dumps(intent) + b"\n")
    _swap(plan.data_path, plan.token, plan.files, plan.guilds)


def _new_generation(root: Path) -> None:
    """Tell every process (this one too) that message files were rewritten: indexes and caches are rebuilt."""
    if root.is_dir():
        atomic_write(root / GENERATION_NAME, secrets.token_hex(8).encode() + b"\n")


def _swap(data_path: Path, token: str, files: list[tuple[str, str, bool]], guilds: list[str]) -> None:
    """Roll forward: every file (and guild folder) of the forget moved aside, the staged versions in place.
    Safe to redo after a crash at any point of it; does nothing (no fsync) when it is complete."""
    root, work = data_path / MESSAGES_DIR, data_path / f"{_WORK}{token}"
    moves: list[tuple[Path, Path]] = []
    for guild, month, staged in files:
        current, old, new = root / guild / f"{month}.jsonl", work / "old" / guild / f"{month}.jsonl", \
            work / "new" / guild / f"{month}.jsonl"
        if not old.exists() and current.exists():
            moves.append((current, old))
        if staged and new.exists():
            moves.append((new, current))
    for guild in guilds:
        current, old = root / guild, work / "guilds" / guild
        if current.exists() and not old.exists():
            moves.append((current, old))
    _move(root, moves)


def _unswap(data_path: Path, token: str, files: list[tuple[str, str, bool]], guilds: list[str]) -> None:
    """Roll back: every file and guild folder moved aside returns (a staged version in place is replaced)."""
    root, work = data_path / MESSAGES_DIR, data_path / f"{_WORK}{token}"
    moves: list[tuple[Path, Path]] = []
    for guild, month, _staged in files:
        current, old = root / guild / f"{month}.jsonl", work / "old" / guild / f"{month}.jsonl"
        if old.exists():
            moves.append((old, current))
    for guild in guilds:
        current, old = root / guild, work / "guilds" / guild
        if old.exists() and not current.exists():
            moves.append((old, current))
    _move(root, moves)


def _move(root: Path, moves: list[tuple[Path, Path]]) -> None:
    """Rename each pair in order (replacing a file in the way), after telling every process that message files
    change (:func:`_new_generation`); then fsync every folder that changed."""
    if not moves:
        return
    _new_generation(root)
    folders: set[Path] = set()
    for src, dst in moves:
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
        folders.update((src.parent, dst.parent))
    sync_all(sorted(folder for folder in folders if folder.is_dir()))


def pending(data_path: Path) -> bool:
    """Whether a forget's intent waits to be resolved (one ``stat``: checked at every lock)."""
    return os.path.lexists(data_path / INTENT_NAME)


def intent_path(data_path: Path) -> str:
    """Where the intent would be, for :func:`intent_pending` (a store computes it once)."""
    return os.fspath(data_path / INTENT_NAME)


def intent_pending(intent: str) -> bool:
    """:func:`pending` given :func:`intent_path`: one ``lstat`` and no path join (checked at every lock)."""
    return os.path.lexists(intent)


_Intent = tuple[str, list[tuple[str, str]], list[tuple[str, str, bool]], list[str], "tuple[int, int, int, str] | None"]


def _read_intent(data_path: Path) -> _Intent:
    path = data_path / INTENT_NAME
    try:
        intent = orjson.loads(path.read_bytes())
        token = intent["token"]
        if type(token) is not str or not _TOKEN.match(token):
            raise ValueError("bad token")
        raw = intent.get("commit")
        commit = None
        if raw is not None:
            commit = (raw["generation"], raw["offset"], raw["length"], raw["digest"])
            if any(type(v) is not int or v < 0 for v in commit[:3]) or type(commit[3]) is not str:
                raise ValueError(f"bad commit {raw!r:.80}")
        keys = [] if commit is not None else [(str(c), str(k)) for c, k in intent["keys"]]
        files = [(str(g), str(m), bool(s)) for g, m, s in intent["files"]]
        guilds = [str(g) for g in intent["guilds"]]
        for g in [*guilds, *(f[0] for f in files)]:
            if not g.isdigit() or "/" in g:
                raise ValueError(f"bad guild folder {g!r}")
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise CorruptDataError(f"{path}: an interrupted forget left this file, but it cannot be read ({exc}); the "
                               "store cannot tell whether it happened: see the README's 'Forgetting and exporting "
                               "data'", path=str(path)) from exc
    return token, keys, files, guilds, commit


def resolve(data_path: Path, data: Mapping[str, Mapping[str, bytes]], holds: JournalHolds, *,
            roll_back: bool = False, remove_work: bool = True, known: ForgetPlan | None = None) -> bool | None:
    """Finish or undo a pending forget (see the module doc); needs the store lock and ``data`` and the journal
    (``holds``, for a transaction's forget) caught up.

    ``roll_back``: the forgetting process knows its documents were never committed (it failed before). Returns
    whether the forget happened, or None when there was no intent. ``remove_work=False`` leaves the work folder
    (garbage once the intent is gone: the forgetting process deletes it after releasing the lock, since it holds
    the old message files, and an open sweeps it if that process dies first).

    ``known``: the plan whose intent (:func:`begin`) this process wrote and has held the store lock since, so the
    intent says what the plan says: taken from the plan, not read back. Read back, a 20k-member guild's keys were
    decoded as 20k two-item lists, which reached the collector's oldest generation while they were made and set off
    a full collection of the whole process heap (holding the GIL) in the forget (benchmarks/README.md).
    """
    if not pending(data_path):
        return None
    if known is not None:
        token, files, guilds, raw = known.token, known.files, known.guilds, known.commit
        commit = None if raw is None else (raw["generation"], raw["offset"], raw["length"], raw["digest"])
        keys: Iterable[tuple[str, str]] = ((c, k) for c, ks in known.keys.items() for k in ks)
    else:
        token, keys, files, guilds, commit = _read_intent(data_path)
    if commit is not None:  # a transaction's: its journal record decides
        happened = not roll_back and holds(*commit)
    else:
        happened = not roll_back and not any(key in data.get(coll, {}) for coll, key in keys)
    if happened:
        _swap(data_path, token, files, guilds)
        root = data_path / MESSAGES_DIR
        for guild in sorted({g for g, _m, _s in files}):  # a guild whose every file went: its folder too
            folder = root / guild
            if folder.is_dir() and not any(os.scandir(folder)):
                os.rmdir(folder)
                fsync_dir(root)
    else:
        _unswap(data_path, token, files, guilds)
    own = token.split("-", 1)[0] == str(os.getpid())
    if not own:
        log.warning("%s: %s an interrupted forget (token %s)", data_path,
                    "completing" if happened else "rolling back", token)
    os.unlink(data_path / INTENT_NAME)
    fsync_dir(data_path)
    if remove_work:
        shutil.rmtree(data_path / f"{_WORK}{token}", ignore_errors=True)
    return happened


def recover(data_path: Path, data: Mapping[str, Mapping[str, bytes]], holds: JournalHolds, *,
            at_open: bool = False) -> None:
    """The store's hook (under the lock, ``data`` and the journal caught up): resolve a pending forget; at open
    also :func:`sweep`. An ``OSError`` propagates (the store reports it; the intent stays, and the next lock or open
    tries again)."""
    if pending(data_path):
        resolve(data_path, data, holds)
    if at_open:
        sweep(data_path)


def sweep(data_path: Path) -> None:
    """Remove work folders no intent refers to (a forget that failed before its intent, then crashed). Needs the
    store lock (a forget stages under it)."""
    if pending(data_path):
        return
    for entry in os.scandir(data_path):
        if entry.name.startswith(_WORK) and is_forget_entry(entry.name) and entry.is_dir(follow_symlinks=False):
            log.info("%s: removing %s left by an interrupted forget", data_path, entry.name)
            shutil.rmtree(entry.path, ignore_errors=True)
