"""A JSON transaction's message work: ``tx.forget_*`` and ``tx.prune_messages`` staged beside the message files,
and committed, all or nothing, by the transaction's own journal record.

Why: the message records live in their own files (``messages/<guild>/<month>.jsonl``), outside the journal that
commits a transaction's documents. A transaction holds the store lock from its first line to its commit, and every
message write takes that lock, so the files cannot change while it is open; what it removes can therefore be
worked out, file by file, when it is asked for, and applied when the transaction commits:

* **Each call** (a forget, a prune; in a worker thread, one at a time per transaction) reads the files as this
  transaction sees them (:class:`View`: the committed file, or this transaction's staged version of it, or
  nothing when it already removed it) and writes the versions without the removed records into a step folder
  of its own, ``storage.forget-<token>/s<n>/``; only when the whole call succeeded does the transaction adopt
  them (:meth:`TxMessages.adopt`, on the event loop), so a call that fails or is cancelled changes nothing.
  Whole months (a prune) and whole guild folders (``forget_guild``) are not copied: they are marked as going.
  The transaction's later lifecycle reads (``tx.export_user``, dry runs, further forgets) read the same view:
  read-your-writes.
* **At commit** (:meth:`TxMessages.finish`): the adopted versions move to ``storage.forget-<token>/new/``
  (where :mod:`.forget_files` expects them) and are fsynced; then the forget protocol of :mod:`.forget_files`
  runs with the transaction's journal record as the deciding side (its ``"commit"``: generation, offset, length
  and digest of the record; see that module): intent, swap, journal commit, resolve. A crash anywhere leaves the
  pre-transaction state (the record was not committed) or the committed one (it was), never a mix.
* **If the block raises** (or is cancelled), the step folders are removed and nothing else was touched; a crash
  before the intent leaves only a work folder without an intent, which the next open removes.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ...fsutil import write_all
from ...messages.records import timestamp_key
from ...ownership import Owner
from . import forget_files
from .message_files import MESSAGES_DIR, FileKey, corrupt, list_files, month_range, parse_record

__all__ = ["TxMessages", "View", "Step", "forget_step", "prune_step"]


@dataclass(frozen=True)
class View:
    """The message files as one transaction sees them (copied on the event loop, read in a worker thread)."""

    root: Path
    files: dict[FileKey, Path | None]  # this transaction's version of a file (None: removed)
    guilds: frozenset[str]  # guild folders this transaction removed whole

    def listing(self, guild: str | None = None) -> list[tuple[FileKey, Path]]:
        """``[((guild, month), path to read)]`` of every file that holds records for this transaction (of
        ``guild`` only, when given), by guild then month."""
        out: list[tuple[FileKey, Path]] = []
        for key, path, _st in list_files(self.root):
            if key[0] in self.guilds or (guild is not None and key[0] != guild):
                continue
            mine = self.files.get(key, path)
            if mine is not None:
                out.append((key, mine))
        return out


@dataclass
class Step:
    """What one call removes: files replaced by a version in ``folder`` (None: the file goes), guild folders that
    go whole, and how many records."""

    folder: Path
    files: dict[FileKey, Path | None] = field(default_factory=dict)
    guilds: set[str] = field(default_factory=set)
    removed: int = 0

    def stage(self, key: FileKey, kept: bytes) -> None:
        """The file ``key`` without what this call removes (``kept``: its remaining complete lines)."""
        if not kept:
            self.files[key] = None
            return
        folder = self.folder / key[0]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{key[1]}.jsonl"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            write_all(fd, kept)
        finally:
            os.close(fd)
        self.files[key] = path


def forget_step(view: View, folder: Path, owner: Owner) -> Step:
    """A forget's message side over ``view`` (in a worker thread): a guild's folder goes whole; a user's records
    are cut out of the files that hold some (found by a bytes search, :func:`forget_files.without_author`)."""
    step = Step(folder)
    if owner.user is None:
        assert owner.guild is not None
        ids: set[int] = set()
        for _key, path in view.listing(owner.guild):
            ids |= forget_files.file_ids(path, path.read_bytes())
        if (view.root / owner.guild).is_dir() and owner.guild not in view.guilds:
            step.guilds.add(owner.guild)
        step.removed = len(ids)
        return step
    for key, path in view.listing(owner.guild):
        found = forget_files.without_author(path, path.read_bytes(), owner.user)
        if found is not None:
            kept, removed = found
            step.stage(key, kept)
            step.removed += len(removed)
    return step


def prune_step(view: View, folder: Path, before: str, guild: str | None) -> Step:
    """``prune_messages`` over ``view`` (in a worker thread; ``before`` a timestamp key): the months before the
    bound's go whole, the bound's own month loses its records before the bound (as the store's prune does)."""
    step = Step(folder)
    month = before[:7]
    partial = before > month_range(month)[0]
    for key, path in view.listing(guild):
        if key[1] < month:
            step.files[key] = None
            step.removed += len(forget_files.file_ids(path, path.read_bytes()))
        elif partial and key[1] == month:
            data = path.read_bytes()
            kept, gone = _without_before(path, data, before)
            if gone:
                step.stage(key, kept)
                step.removed += gone
    return step


def _without_before(path: Path, data: bytes, before: str) -> tuple[bytes, int]:
    """A file's complete lines without those timestamped before ``before``; and how many ids lost every line."""
    out: list[bytes] = []
    dropped: set[str] = set()
    kept: set[str] = set()
    start = 0
    end = data.rfind(b"\n") + 1
    while start < end:
        stop = data.index(b"\n", start)
        try:
            rec = parse_record(data[start:stop])
        except ValueError as exc:
            raise corrupt(path, start, exc) from None
        if timestamp_key(rec["timestamp"]) < before:
            dropped.add(rec["message_id"])
        else:
            kept.add(rec["message_id"])
            out.append(data[start:stop + 1])
        start = stop + 1
    return b"".join(out), len(dropped - kept)  # all lines of an id share its timestamp: normally all of dropped


class TxMessages:
    """One JSON transaction's staged message work (see the module doc)."""

    def __init__(self, data_path: Path) -> None:
        self.data_path = data_path
        self.token = forget_files.new_token()
        self.files: dict[FileKey, Path | None] = {}
        self.guilds: set[str] = set()
        self._steps = 0
        self._started = False  # a step folder may exist

    @property
    def work(self) -> Path:
        return self.data_path / f"{forget_files.WORK_PREFIX}{self.token}"

    @property
    def empty(self) -> bool:
        """Nothing staged: the transaction commits as usual."""
        return not (self.files or self.guilds)

    def view(self) -> View:
        """This transaction's view of the files, copied (on the event loop) for a worker thread."""
        return View(self.data_path / MESSAGES_DIR, dict(self.files), frozenset(self.guilds))

    def next_folder(self) -> Path:
        """A fresh step folder (created by the step's first staged file)."""
        self._steps += 1
        self._started = True
        return self.work / f"s{self._steps}"

    def adopt(self, step: Step) -> None:
        """Make a finished step part of the transaction (on the event loop, no await: all at once)."""
        self.files.update(step.files)
        for guild in step.guilds:
            self.guilds.add(guild)
            for key in [k for k in self.files if k[0] == guild]:
                del self.files[key]  # the whole folder goes: its staged versions are moot

    def finish(self, commit: dict[str, object]) -> forget_files.ForgetPlan:
        """At commit, in a worker thread: the adopted versions moved to ``new/`` and fsynced, with the folders the
        swap uses; returns the plan :func:`forget_files.begin` writes the intent of (``commit``: the journal
        record that decides it). On an error nothing was committed (the caller discards)."""
        plan = forget_files.ForgetPlan(self.data_path, self.token, commit=dict(commit))
        synced: list[Path] = []
        for (guild, month), path in sorted(self.files.items()):
            if path is not None:
                target = self.work / "new" / guild / f"{month}.jsonl"
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, target)
                synced.append(target)
            plan.files.append((guild, month, path is not None))
        plan.guilds = sorted(self.guilds)
        (self.work / "old").mkdir(parents=True, exist_ok=True)
        (self.work / "guilds").mkdir(exist_ok=True)
        folders = sorted({p.parent for p in synced})
        forget_files.sync_all([*synced, *folders, *([self.work / "new"] if synced else []), self.work])
        return plan

    def discard(self) -> None:
        """The transaction did not commit (or failed before its intent): remove what it staged."""
        if self._started:
            shutil.rmtree(self.work, ignore_errors=True)
