"""The portable backup format: one folder per backup, plain JSON Lines plus a manifest, identical for every backend.

Layout of ``<backup_dir>/<id>/`` (``id`` is the UTC time ``YYYYmmdd_HHMMSS``, ``_2``, ``_3``... when taken in the
same second)::

    manifest.json                  what the backup holds (and the declared indexes); written last (plain JSON)
    collections/<name>.jsonl.gz    one line per document: {"key":"<key>","doc":{...}}, in key order
    messages.jsonl.gz              one message-analytics record per line (when the store has messages)
    files/data/<path>.gz           every file of a JSON store's data folder that the store does not own
    files/extra/<abs path>.gz      files named by STORAGE_BACKUP_EXTRA / --extra (see storage.backup.files)

Compression: gzip (the stdlib's ``zlib``, level 3: about as fast as level 1 and 10% smaller), so every file opens
with ``zcat``/``zgrep``/``gunzip``/``jq`` after ``gunzip -c``. Sizes, hashes and line counts in the manifest are
those of the *uncompressed* content (what the data is); ``stored_bytes`` is the size on disk. Format 1 backups
(uncompressed ``.jsonl``, no ``files``) are read, verified and restored as before.

Why a folder of JSON Lines rather than one archive: every file can be read, grepped and diffed with ordinary tools
(``jq``, ``grep``, ``head``), a single collection can be pulled out by hand, the writer streams record by record
without holding the store in memory, and each file has its own checksum, so verification names the damaged file.
Anyone who wants one file can ``tar`` the folder. Documents are written as the backend returns them (a JSON
store's key order survives a backup and restore); the per-collection content digests use a canonical form (keys
sorted), so the same data backed up from JSON files and from PostgreSQL has the same digests.

Why this is safe to trust:

* **Atomic.** Everything is written into a hidden temp folder (``.<id>.tmp-<pid>-<hex>``), each file is fsynced,
  the manifest is written last, then the folder is renamed to its id and the parent directory is fsynced. A crash
  leaves only a hidden temp folder, which listing ignores and the next backup removes.
* **Verifiable.** The manifest records every file's sha256, size and line count, per-collection content digests,
  and a checksum of the manifest itself; :func:`verify_backup_dir` checks all of them.
* **Confined.** An id is accepted only if it is a backup name; a symlink, an absolute path or ``..`` is refused,
  and files are opened without following symlinks.
* **Private.** Folders are created ``0700`` and files ``0600``: a backup holds every member's data.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import re
import secrets
import shutil
import zlib
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson

from ..codec import check_collection, dumps_canonical
from ..errors import BackupError, ValidationError
from ..fsutil import TEMP_MARK, fsync_dir, make_dirs, pid_alive, sync_fd, write_all
from ..offload import Pacer
from ..progress import NullProgress, Progress
from .indexes import manifest_indexes
from .source import manifest_source

__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "MANIFEST_NAME", "MESSAGES_FILE", "MESSAGES_DIGEST_NAME", "EMPTY_DIGEST",
    "BackupInfo", "BackupReport", "ContentDigest", "JsonlWriter",
    "canonical", "trimmed", "check_backup_id", "backup_sort_key", "resolve_backup", "collection_file",
    "new_temp_dir", "publish", "read_manifest", "write_manifest", "info_from_manifest", "verify_backup_dir",
    "iter_lines", "remove_dir", "stale_temp_dirs", "migration_version", "read_content", "read_loose_file",
    "loose_files", "FILES_DIR", "GZ",
]

FORMAT_NAME = "storage-backup"
FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
COLLECTIONS_DIR = "collections"
FILES_DIR = "files"
GZ = ".gz"
GZIP_LEVEL = 3
MESSAGES_FILE = "messages.jsonl" + GZ
_MESSAGES_FILES = ("messages.jsonl", MESSAGES_FILE)
#: The digest name of the messages: ``#`` can never start a collection name, so it cannot collide with one.
MESSAGES_DIGEST_NAME = "#messages"
#: The digest of nothing (no records added).
EMPTY_DIGEST = "0" * 64
DIR_MODE = 0o700
FILE_MODE = 0o600
_CHUNK = 1 << 20
_ID_RE = re.compile(r"(\d{8}_\d{6})(?:_([1-9][0-9]{0,3}))?\Z")
_TEMP_DIR_RE = re.compile(r"\.(?:\d{8}_\d{6}|deleting-.+)" + re.escape(TEMP_MARK) + r"(\d+)-[0-9a-f]{8}\Z")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_VERSION_RE = re.compile(r"[0-9]{1,9}(?:\.[0-9]{1,9}){0,7}\Z")


# ---------------------------------------------------------------------------------------------------------------
# what callers get back
@dataclasses.dataclass(frozen=True)
class BackupInfo:
    """One backup as its manifest describes it (cheap: only the manifest is read)."""

    id: str
    path: Path
    created_at: datetime
    backend: str
    library_version: str
    format_version: int
    migration_version: str | None
    counts: dict[str, int]
    messages: int | None
    size_bytes: int
    label: str | None = None
    digests: dict[str, str] = dataclasses.field(default_factory=dict, repr=False)
    #: the store it came from (see :mod:`storage.backup.source`); ``None`` when the manifest does not say
    source: dict[str, str] | None = None
    #: files copied beside the data (``data:<path in the folder>`` / ``extra:<absolute path>``) -> bytes
    files: dict[str, int] = dataclasses.field(default_factory=dict)
    #: bytes of the uncompressed content (``size_bytes`` is what the backup takes on disk)
    raw_bytes: int = 0

    @property
    def records(self) -> int:
        """Documents plus messages: what a restore walks."""
        return sum(self.counts.values()) + (self.messages or 0)


@dataclasses.dataclass
class BackupReport:
    """The result of verifying a backup: ``ok`` only when every file, hash and count matched the manifest."""

    id: str
    ok: bool
    problems: list[str]
    counts: dict[str, int]
    messages: int | None = None
    info: BackupInfo | None = None

    def raise_if_failed(self) -> None:
        if not self.ok:
            raise BackupError(f"backup {self.id} failed verification: " + "; ".join(self.problems))


# ---------------------------------------------------------------------------------------------------------------
# canonical bytes and content digests
def canonical(doc: Mapping[str, Any]) -> bytes:
    """The one byte form of a document used in backup files and digests: compact, keys sorted.

    PostgreSQL's jsonb reorders keys and JSON files keep insertion order; sorting makes both give the same bytes.
    Numbers are in the canonical form documents are stored in (``-0.0`` as ``0.0``, big integral floats as ints:
    see storage/codec.py), so a document written before that form was enforced digests like its copy.
    """
    return dumps_canonical(doc, option=orjson.OPT_SORT_KEYS)


def trimmed(data: bytes) -> bytes:
    """An exact-size copy of ``data``, for bytes that are kept while many more are made.

    orjson (3.12 here) returns ``bytes`` whose allocation is rounded up (about 4 KB for a 300-byte document) and
    never shrunk; holding a 100k-document collection of them costs ~400 MB instead of ~30 MB. A join with an empty
    second part (a join of one part returns that part itself): 0.05 us against 0.14 for ``bytes(memoryview())``.
    """
    return _join((data, b""))


_join = b"".join


class ContentDigest:
    """An order-independent digest of ``(collection, key, canonical doc)`` triples, one per collection.

    Each record's sha256 is added modulo 2**256, so the result does not depend on the order in which a backend
    returns records (PostgreSQL collations and JSON files may differ) while any changed, missing or extra record
    changes it. ``\\0`` separators are unambiguous: neither collection names nor keys may contain NUL.
    """

    _MASK = (1 << 256) - 1

    def __init__(self) -> None:
        self._sums: dict[str, int] = {}
        self.counts: dict[str, int] = {}

    def add(self, collection: str, key: str, canonical_doc: bytes) -> None:
        h = hashlib.sha256(b"%s\0%s\0%s" % (collection.encode(), key.encode(), canonical_doc)).digest()
        self._sums[collection] = (self._sums.get(collection, 0) + int.from_bytes(h, "big")) & self._MASK
        self.counts[collection] = self.counts.get(collection, 0) + 1

    def hexdigests(self) -> dict[str, str]:
        return {name: f"{value:064x}" for name, value in sorted(self._sums.items())}


# ---------------------------------------------------------------------------------------------------------------
# ids and paths
def check_backup_id(backup_id: object) -> str:
    """A backup id, or :class:`BackupError`: only names this library creates are accepted (no paths)."""
    if not isinstance(backup_id, str) or not _ID_RE.match(backup_id):
        raise BackupError(f"{backup_id!r} is not a backup id (expected YYYYmmdd_HHMMSS or YYYYmmdd_HHMMSS_N)")
    return backup_id


def backup_sort_key(backup_id: str) -> tuple[str, int]:
    """Chronological order: ``..._9`` sorts before ``..._10``."""
    match = _ID_RE.match(backup_id)
    if match is None:
        raise BackupError(f"{backup_id!r} is not a backup id")
    return match.group(1), int(match.group(2) or 1)


def resolve_backup(backup_dir: Path, backup_id: object) -> Path:
    """The folder of backup ``backup_id`` inside ``backup_dir``; refuses anything that would leave that folder."""
    name = check_backup_id(backup_id)
    path = backup_dir / name
    try:
        st = path.lstat()
    except FileNotFoundError:
        raise BackupError(f"backup {name} not found in {backup_dir}") from None
    except OSError as exc:
        raise BackupError(f"cannot read backup {name} in {backup_dir}: {exc}") from exc
    if path.is_symlink():
        raise BackupError(f"backup {name} in {backup_dir} is a symlink: refusing to follow it")
    if not os.path.isdir(path) or (st.st_mode & 0o170000) != 0o040000:
        raise BackupError(f"backup {name} in {backup_dir} is not a folder")
    if os.path.realpath(path) != os.path.join(os.path.realpath(backup_dir), name):
        raise BackupError(f"backup {name} resolves outside {backup_dir}: refusing it")
    return path


def collection_file(collection: str, compressed: bool = True) -> str:
    return f"{COLLECTIONS_DIR}/{collection}.jsonl" + (GZ if compressed else "")


def _check_member_file(relative: object) -> str:
    """A file name from a manifest: only the names this format uses (a hand-edited manifest cannot point out)."""
    if relative in _MESSAGES_FILES:
        return str(relative)
    if isinstance(relative, str) and relative.startswith(COLLECTIONS_DIR + "/"):
        stem = relative[len(COLLECTIONS_DIR) + 1:]
        stem = stem[:-len(GZ)] if stem.endswith(GZ) else stem
        if stem.endswith(".jsonl"):
            try:
                check_collection(stem[:-6])
                return relative
            except ValidationError:
                pass
    if isinstance(relative, str) and relative.startswith(FILES_DIR + "/") and relative.endswith(GZ):
        parts = relative.split("/")
        if len(parts) >= 3 and parts[1] in ("data", "extra") and all(p not in ("", ".", "..") for p in parts) \
                and "\0" not in relative and "\\" not in relative:
            return relative
    raise BackupError(f"manifest names an unexpected file {relative!r}")


def new_temp_dir(backup_dir: Path, provisional_id: str) -> Path:
    """Create the hidden, owner-only folder a backup is written into before it is published."""
    try:
        make_dirs(backup_dir.parent)  # each new folder's entry fsynced in its parent, as for the data folder
        make_dirs(backup_dir, DIR_MODE)  # only the backup folder itself is owner-only, as before
        tmp = backup_dir / f".{provisional_id}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir(mode=DIR_MODE)
        os.chmod(tmp, DIR_MODE)  # mkdir's mode is filtered by the umask; chmod is not
        (tmp / COLLECTIONS_DIR).mkdir(mode=DIR_MODE)
        os.chmod(tmp / COLLECTIONS_DIR, DIR_MODE)
    except OSError as exc:
        raise BackupError(f"cannot create a backup folder in {backup_dir}: {exc}") from exc
    return tmp


def publish(tmp: Path, backup_dir: Path, when: datetime) -> str:
    """Rename the finished temp folder to a new id for ``when``; the rename is the moment the backup exists.

    Ids must sort in creation order, so a backup taken in a second that already has backups gets the next suffix
    after the highest one (``_2``, ``_3``...), never a gap left by a pruned one. ``rename`` onto an existing
    non-empty folder fails (``ENOTEMPTY``/``EEXIST``) instead of replacing it, so two processes racing for one id
    cannot both get it: the loser looks again.
    """
    base = when.astimezone(timezone.utc).strftime("%Y%m%d_%H%M%S")
    fsync_dir(tmp / COLLECTIONS_DIR)
    fsync_dir(tmp)
    for _attempt in range(100):
        taken = [backup_sort_key(e.name)[1] for e in os.scandir(backup_dir)
                 if e.name.startswith(base) and _ID_RE.match(e.name)]
        n = max(taken) + 1 if taken else 1
        if n > 9999:
            break
        name = base if n == 1 else f"{base}_{n}"
        try:
            os.rename(tmp, backup_dir / name)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                continue
            raise BackupError(f"cannot publish the backup in {backup_dir}: {exc}") from exc
        fsync_dir(backup_dir)
        return name
    raise BackupError(f"{backup_dir}: no free backup id left for {base}")


def remove_dir(path: Path) -> None:
    """Delete a backup so that a crash midway never leaves a partial folder under a backup id.

    The folder is first renamed to a hidden ``.deleting-...`` name (atomic), then removed.
    """
    hidden = path.with_name(f".deleting-{path.name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")
    os.rename(path, hidden)
    fsync_dir(path.parent)
    shutil.rmtree(hidden)


def stale_temp_dirs(backup_dir: Path) -> list[Path]:
    """Hidden temp folders left by backups or deletions whose process is gone (killed, crashed)."""
    out = []
    try:
        entries = list(os.scandir(backup_dir))
    except FileNotFoundError:
        return []
    for entry in entries:
        match = _TEMP_DIR_RE.match(entry.name)
        if match and entry.is_dir(follow_symlinks=False) and not pid_alive(int(match.group(1))):
            out.append(Path(entry.path))
    return out



# ---------------------------------------------------------------------------------------------------------------
# writing
def _owner_only(fd: int) -> None:
    """``0600`` whatever the umask (``open``'s mode is filtered by it). Windows has no ``fchmod``: skipped."""
    if hasattr(os, "fchmod"):
        os.fchmod(fd, FILE_MODE)


class JsonlWriter:
    """An owner-only file written in large chunks, hashed and counted as it goes, gzipped when its name ends in
    ``.gz``, fsynced on close. The hash, size and count are those of the uncompressed lines."""

    def __init__(self, root: Path, relative: str) -> None:
        self.relative = relative
        self.path = root / relative
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, FILE_MODE)
        _owner_only(self.fd)
        self._hash = hashlib.sha256()
        self._gzip = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31) if relative.endswith(GZ) else None
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._pacer = Pacer()  # the writing thread's pauses for the event loop (hash, gzip and write: see Pacer)
        self.count = 0
        self.size = 0
        self.stored = 0

    def write(self, line: bytes) -> None:
        """Append one line (``line`` ends with a newline)."""
        self._buffer.append(line)
        self._buffered += len(line)
        self.count += 1
        if self._buffered >= _CHUNK:
            self._flush()
        self._pacer.tick()

    def write_block(self, block: bytes, lines: int) -> None:
        """Append ``lines`` whole lines at once (``block`` ends with a newline, or is empty)."""
        self._flush()
        self.count += lines
        self._put(block)

    def _flush(self) -> None:
        if not self._buffer:
            return
        data = b"".join(self._buffer)
        self._buffer, self._buffered = [], 0
        self._put(data)

    def _put(self, data: bytes) -> None:
        if not data:
            return
        self._hash.update(data)
        self.size += len(data)
        out = self._gzip.compress(data) if self._gzip is not None else data
        write_all(self.fd, out)
        self.stored += len(out)

    def close(self) -> dict[str, Any]:
        """Flush, fsync and close; returns the manifest entry for this file."""
        try:
            self._flush()
            if self._gzip is not None:
                tail = self._gzip.flush()
                write_all(self.fd, tail)
                self.stored += len(tail)
            sync_fd(self.fd)
        finally:
            self.abort()
        entry: dict[str, Any] = {"file": self.relative, "count": self.count, "bytes": self.size,
                                 "sha256": self._hash.hexdigest()}
        if self._gzip is not None:
            entry.update(compression="gzip", stored_bytes=self.stored)
        return entry

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _manifest_checksum(manifest: Mapping[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest last, with its own checksum, fsynced: its presence marks a complete backup."""
    manifest = {**manifest, "checksum": _manifest_checksum(manifest)}
    data = orjson.dumps(manifest, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
    fd = os.open(root / MANIFEST_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, FILE_MODE)
    try:
        _owner_only(fd)
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------------------
# reading
def _open_member(root: Path, relative: str) -> int:
    """Open a file of the backup for reading, refusing symlinks and anything that is not a regular file."""
    fd = os.open(root / relative, os.O_RDONLY | _NOFOLLOW)
    if (os.fstat(fd).st_mode & 0o170000) != 0o100000:
        os.close(fd)
        raise BackupError(f"{relative} is not a regular file")
    return fd


def read_content(root: Path, relative: str) -> Iterator[bytes]:
    """The uncompressed content of one backup file, in chunks (gunzipped when its name ends in ``.gz``).

    Raises :class:`BackupError` for a damaged or truncated gzip stream, ``OSError`` for the file itself.
    """
    fd = _open_member(root, relative)
    with os.fdopen(fd, "rb") as f:
        if not relative.endswith(GZ):
            while chunk := f.read(_CHUNK):
                yield chunk
            return
        # Each piece inflated to at most _CHUNK bytes: 256 KB of gzipped JSON lines is ~5 MB, which the caller's
        # one ``split`` into lines (holding the GIL) took 3-7 ms at a time
        inflate = zlib.decompressobj(31)
        while data := f.read(_CHUNK // 4):
            while data:
                if inflate.eof:  # another gzip member follows (as `cat a.gz b.gz > c.gz` makes)
                    inflate = zlib.decompressobj(31)
                try:
                    out = inflate.decompress(data, _CHUNK)
                except zlib.error as exc:
                    raise BackupError(f"{relative}: not a valid gzip stream ({exc})") from exc
                data = inflate.unused_data if inflate.eof else inflate.unconsumed_tail
                if out:
                    yield out
        if not inflate.eof:
            try:
                out = inflate.flush()  # what the bound held back once the input ran out
            except zlib.error as exc:
                raise BackupError(f"{relative}: not a valid gzip stream ({exc})") from exc
            if out:
                yield out
        if not inflate.eof:
            raise BackupError(f"{relative}: the gzip stream is truncated")


def read_manifest(root: Path) -> dict[str, Any]:
    """The parsed manifest, checked for shape and its own checksum; :class:`BackupError` says what is wrong."""
    try:
        fd = _open_member(root, MANIFEST_NAME)
    except FileNotFoundError:
        raise BackupError(f"{MANIFEST_NAME} is missing (an unfinished backup, or a folder this library did not "
                          "write, such as a seed-era copy of config/)") from None
    except OSError as exc:
        raise BackupError(f"cannot open {MANIFEST_NAME}: {exc}") from exc
    try:
        with os.fdopen(fd, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise BackupError(f"cannot read {MANIFEST_NAME}: {exc}") from exc
    try:
        manifest = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BackupError(f"{MANIFEST_NAME} is not valid JSON: {exc}") from exc
    if type(manifest) is not dict or manifest.get("format") != FORMAT_NAME:
        raise BackupError(f"{MANIFEST_NAME} is not a {FORMAT_NAME} manifest")
    version = manifest.get("format_version")
    if type(version) is not int or not 1 <= version <= FORMAT_VERSION:
        raise BackupError(f"backup format version {version!r} is not supported (this library reads 1 to "
                          f"{FORMAT_VERSION}); upgrade the library")
    if manifest.get("checksum") != _manifest_checksum(manifest):
        raise BackupError(f"{MANIFEST_NAME} checksum does not match its content (the manifest was damaged)")
    try:
        entries = _file_entries(manifest)
        for name, entry in entries.items():
            if name != MESSAGES_DIGEST_NAME and entry["file"] not in (collection_file(name),
                                                                       collection_file(name, False)):
                raise BackupError(f"collection {name!r} points at {entry['file']!r}")
        loose_files(manifest)
        manifest_indexes(manifest)
    except (KeyError, TypeError, AttributeError, ValidationError) as exc:
        raise BackupError(f"{MANIFEST_NAME} is malformed: {exc!r}") from exc
    return manifest


def _file_entries(manifest: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{collection or '#messages': {"file", "count", "bytes", "sha256"}}``, file names checked."""
    out: dict[str, dict[str, Any]] = {}
    for name, entry in manifest["collections"].items():
        check_collection(name)
        _check_member_file(entry["file"])
        out[name] = entry
    if manifest.get("messages") is not None:
        entry = manifest["messages"]
        if entry["file"] not in _MESSAGES_FILES:
            raise BackupError(f"messages point at {entry['file']!r}")
        out[MESSAGES_DIGEST_NAME] = entry
    for entry in out.values():
        if type(entry["count"]) is not int or type(entry["bytes"]) is not int or type(entry["sha256"]) is not str:
            raise BackupError(f"{MANIFEST_NAME} entry for {entry['file']!r} is malformed")
    return out


def loose_files(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The manifest's ``files`` (format 2): files that are not collections, copied byte for byte (see
    :mod:`storage.backup.files`); each ``{"origin": "data"|"extra", "path", "file", "bytes", "sha256", ...}``."""
    files = manifest.get("files") or []
    if type(files) is not list:
        raise BackupError(f"{MANIFEST_NAME}: 'files' is malformed")
    for entry in files:
        if (type(entry) is not dict or entry.get("origin") not in ("data", "extra")
                or type(entry.get("path")) is not str or type(entry.get("bytes")) is not int
                or type(entry.get("sha256")) is not str):
            raise BackupError(f"{MANIFEST_NAME}: a 'files' entry is malformed: {entry!r}")
        _check_member_file(entry["file"])
    return files


def _parse_time(text: object, fallback_id: str) -> datetime:
    if isinstance(text, str):
        try:
            dt = datetime.fromisoformat(text)
            return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)
        except ValueError:
            pass
    return datetime.strptime(fallback_id[:15], "%Y%m%d_%H%M%S").replace(tzinfo=timezone.utc)


def info_from_manifest(backup_id: str, path: Path, manifest: Mapping[str, Any]) -> BackupInfo:
    """The :class:`BackupInfo` of a manifest that :func:`read_manifest` accepted; BackupError if malformed."""
    try:
        return _info(backup_id, path, manifest)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BackupError(f"{MANIFEST_NAME} is malformed: {exc!r}") from exc


def _info(backup_id: str, path: Path, manifest: Mapping[str, Any]) -> BackupInfo:
    entries = _file_entries(manifest)
    messages = manifest.get("messages")
    return BackupInfo(
        id=backup_id,
        path=path,
        created_at=_parse_time(manifest.get("created_at"), backup_id),
        backend=str(manifest.get("source", {}).get("backend", "?")),
        library_version=str(manifest.get("library_version", "?")),
        format_version=int(manifest["format_version"]),
        migration_version=manifest.get("migration_version"),
        counts={name: int(entry["count"]) for name, entry in manifest["collections"].items()},
        messages=int(messages["count"]) if messages is not None else None,
        size_bytes=sum(int(e.get("stored_bytes", e["bytes"])) for e in [*entries.values(), *loose_files(manifest)]),
        raw_bytes=sum(int(e["bytes"]) for e in [*entries.values(), *loose_files(manifest)]),
        files={f"{e['origin']}:{e['path']}": int(e["bytes"]) for e in loose_files(manifest)},
        label=manifest.get("label"),
        digests={name: str(e.get("digest", "")) for name, e in entries.items()},
        source=manifest_source(manifest),
    )


def iter_lines(root: Path, entry: Mapping[str, Any]) -> Iterator[bytes]:
    """The lines of one backup file, re-hashed while read: raises :class:`BackupError` at the end if the bytes
    differ from the manifest (the file changed after verification), before the caller commits anything."""
    relative = _check_member_file(entry["file"])
    digest = hashlib.sha256()
    count = 0
    tail = b""
    pacer = Pacer()  # the reading thread's pauses for the event loop (read, inflate, split: see Pacer)
    try:
        for chunk in read_content(root, relative):
            digest.update(chunk)
            lines = (tail + chunk).split(b"\n")
            tail = lines.pop()
            count += len(lines)
            for line in lines:
                yield line
                pacer.tick()
    except OSError as exc:
        raise BackupError(f"cannot read {relative}: {exc}") from exc
    if tail:
        raise BackupError(f"{relative} does not end with a newline (truncated)")
    if digest.hexdigest() != entry["sha256"] or count != entry["count"]:
        raise BackupError(f"{relative} changed since it was verified (sha256 or line count differs)")


def read_loose_file(root: Path, entry: Mapping[str, Any]) -> bytes:
    """The whole content of a ``files`` entry, checked against its sha256 (:class:`BackupError` otherwise)."""
    relative = _check_member_file(entry["file"])
    try:
        data = b"".join(read_content(root, relative))
    except OSError as exc:
        raise BackupError(f"cannot read {relative}: {exc}") from exc
    if hashlib.sha256(data).hexdigest() != entry["sha256"] or len(data) != entry["bytes"]:
        raise BackupError(f"{relative} changed since it was verified (sha256 or size differs)")
    return data


def _check_file(root: Path, entry: Mapping[str, Any], progress: Progress) -> list[str]:
    """Hash and count one file (its uncompressed content); returns the problems found."""
    relative = entry["file"]
    digest = hashlib.sha256()
    size = lines = 0
    last = b"\n"
    # Each chunk is a read, an inflate and a hash that let go of the GIL and a count that keeps it: the GIL convoy
    # of storage.offload.Pacer, which kept the event loop waiting 20-30 ms at a time through a restore's check
    pacer = Pacer()
    try:
        stored = os.lstat(root / relative).st_size
        for chunk in read_content(root, relative):
            digest.update(chunk)
            size += len(chunk)
            found = chunk.count(b"\n")
            lines += found
            progress.advance(found)
            last = chunk[-1:]
            pacer.tick()
    except FileNotFoundError:
        return [f"{relative}: missing"]
    except BackupError as exc:
        return [str(exc)]
    except OSError as exc:
        return [f"{relative}: read error ({exc})"]
    problems = []
    if "stored_bytes" in entry and stored != entry["stored_bytes"]:
        problems.append(f"{relative}: {stored} bytes on disk, manifest says {entry['stored_bytes']}")
    if size != entry["bytes"]:
        problems.append(f"{relative}: size is {size} bytes, manifest says {entry['bytes']}")
    if digest.hexdigest() != entry["sha256"]:
        problems.append(f"{relative}: sha256 mismatch (the file is damaged or was modified)")
    if "count" in entry and (lines != entry["count"] or (size and last != b"\n")):
        problems.append(f"{relative}: holds {lines} complete records, manifest says {entry['count']}")
    return problems


def verify_backup_dir(backup_dir: Path, backup_id: str, progress: Progress | None = None) -> BackupReport:
    """Check one backup completely: manifest, every file's size, sha256 and record count, and no stray files.

    Runs in a thread (pure I/O and hashing). Never raises for a damaged backup: the problems are in the report.
    An id that is not a backup name, or resolves outside ``backup_dir``, still raises :class:`BackupError`.
    """
    root = resolve_backup(backup_dir, backup_id)
    try:
        manifest = read_manifest(root)
        entries = _file_entries(manifest)
        info = info_from_manifest(backup_id, root, manifest)
    except (BackupError, ValidationError, KeyError, TypeError) as exc:
        return BackupReport(backup_id, False, [str(exc)], {})
    problems: list[str] = []
    progress = progress or NullProgress()
    progress.phase(f"verify {backup_id}", sum(int(e["count"]) for e in entries.values()))
    try:
        files = loose_files(manifest)
        for entry in [*entries.values(), *files]:
            problems.extend(_check_file(root, entry, progress))
    finally:
        progress.done()
    expected = {e["file"] for e in [*entries.values(), *files]} | {MANIFEST_NAME, COLLECTIONS_DIR}
    expected |= {"/".join(e["file"].split("/")[:depth]) for e in files for depth in range(1, e["file"].count("/") + 1)}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            relative = os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
            if relative not in expected:
                problems.append(f"{relative}: not part of the backup (unexpected file)")
    return BackupReport(backup_id, not problems, problems, dict(info.counts), info.messages, info)


def migration_version(keys: list[str]) -> str | None:
    """The highest version among the migration ledger's keys (compared as numbers: 1.10.0 > 1.9.0).

    Keys that are not versions (a lock or state record the migrator may keep beside the ledger) are ignored.
    """
    versions = [k for k in keys if _VERSION_RE.match(k)]
    if not versions:
        return None
    return max(versions, key=lambda v: tuple(int(p) for p in v.split(".")))
