"""Files a backup carries beside the data: the JSON data folder's other files, and extra files the operator names.

The seed's ``create_backup`` copied ``members.json``, ``spam_blocker.json`` and ``version.json`` from ``config/``
and the bot folder's ``message*.json``/``roles*.json``. A backup that holds only the collections silently lost
``version.json``, a flat ``spam_blocker.json`` (a JSON file that is not a collection of objects), and everything
else a bot keeps next to its data. So a backup also holds, byte for byte (gzipped, sha256 of the content in the
manifest):

* **data**: every regular file under a JSON store's data folder that the store does not own. The store owns its
  collection snapshots (``<collection>.json`` of every collection it loaded), the message log (``messages/``),
  every ``storage.*`` file at the top (journal, locks, restore intent), the folders of a restore in progress, and
  temp files. A backup folder inside the data folder is skipped, as are symlinks and special files (listed in the
  manifest's ``skipped_files`` with the reason).
* **extra**: files outside the folder named by ``STORAGE_BACKUP_EXTRA`` / ``--extra``: paths or globs (``**``
  allowed), relative to the working directory, recorded by absolute path. A folder named there contributes its
  files. A pattern that matches nothing is noted in ``skipped_files``.

Restore puts each file back where it came from (data files into the *target* JSON store's folder, extra files at
their absolute paths), atomically (temp file, fsync, rename), only when its content differs, and removes nothing
it did not back up. A data file whose name the target store owns by now (it became a collection) is not written:
the report says so. A PostgreSQL target has no data folder: data files are reported as not restored.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..errors import BackupError
from ..fsutil import TEMP_MARK, fsync_dir, sync_fd, temp_name, write_all
from .format import FILES_DIR, GZ, JsonlWriter, read_loose_file

__all__ = ["collect", "write_files", "restore_files", "FileChange"]

_CHUNK = 1 << 20
_TEMP_RE = re.compile(r".+" + re.escape(TEMP_MARK) + r"\d+-[0-9a-f]{8}\Z")
#: What a restore does to a file: restored, unchanged, would change, or why it was not written.
FileChange = str


#: ``owns(name, is_dir)``: whether a top-level entry of the data folder belongs to the store
#: (:meth:`storage.interfaces.Backend.owns_entry`): the store's own files are backed up as data, not byte for byte.
Owns = Callable[[str, bool], bool]


def collect(data_path: Path | None, owns: Owns, patterns: Iterable[str],
            exclude: Iterable[Path]) -> tuple[list[tuple[str, str, Path]], dict[str, str]]:
    """``([(origin, recorded path, file)], skipped)``: what to back up, and what was left out and why.

    ``data_path`` is the JSON data folder (``None`` for a store without one); ``exclude`` are folders never to
    back up (the backup folder itself).
    """
    excluded = [os.path.realpath(p) for p in exclude]
    out: list[tuple[str, str, Path]] = []
    skipped: dict[str, str] = {}
    seen: set[str] = set()

    def consider(origin: str, recorded: str, path: Path) -> None:
        real = os.path.realpath(path)
        if real in seen or any(real == e or real.startswith(e + os.sep) for e in excluded):
            return
        try:
            st = os.lstat(path)
        except OSError as exc:
            skipped[f"{origin}:{recorded}"] = f"cannot read it ({exc.strerror})"
            return
        if stat.S_ISLNK(st.st_mode):
            skipped[f"{origin}:{recorded}"] = "a symlink (not followed: back up its target by name)"
        elif not stat.S_ISREG(st.st_mode):
            skipped[f"{origin}:{recorded}"] = "not a regular file"
        elif _TEMP_RE.match(path.name):
            return
        else:
            seen.add(real)
            out.append((origin, recorded, path))

    data_real = os.path.realpath(data_path) if data_path is not None else None
    if data_path is not None and data_path.is_dir():
        for dirpath, dirnames, filenames in os.walk(data_path):
            top = Path(dirpath) == data_path
            if top:
                dirnames[:] = [d for d in dirnames if not owns(d, True)]
            dirnames.sort()
            for name in sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]):
                if top and owns(name, False):
                    continue
                path = Path(dirpath) / name
                consider("data", path.relative_to(data_path).as_posix(), path)
            dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matches:
            skipped[f"extra:{pattern}"] = "matched nothing"
        for match in matches:
            absolute = Path(os.path.abspath(match))
            if data_real is not None and (os.path.realpath(absolute) + os.sep).startswith(data_real + os.sep):
                continue  # inside the data folder: backed up as data (or owned by the store)
            if absolute.is_dir() and not absolute.is_symlink():
                for dirpath, dirnames, filenames in os.walk(absolute):
                    dirnames.sort()
                    for name in sorted(filenames):
                        consider("extra", str(Path(dirpath) / name), Path(dirpath) / name)
            else:
                consider("extra", str(absolute), absolute)
    return out, skipped


def _stored_name(origin: str, recorded: str) -> str:
    parts = [p for p in recorded.split("/") if p]
    return "/".join([FILES_DIR, origin, *parts]) + GZ


def write_files(root: Path, files: list[tuple[str, str, Path]]) -> list[dict[str, Any]]:
    """Copy each file into the backup (gzipped), hashing the content as it is read. Runs in a thread."""
    entries: list[dict[str, Any]] = []
    for origin, recorded, path in files:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError as exc:
            raise BackupError(f"cannot read {path} for the backup: {exc}") from exc
        writer = JsonlWriter(root, _stored_name(origin, recorded))
        try:
            with os.fdopen(fd, "rb") as f:
                mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
                while chunk := f.read(_CHUNK):
                    writer.write_block(chunk, 0)
            entry = writer.close()
        finally:
            writer.abort()
        del entry["count"]  # bytes, not records
        entries.append({"origin": origin, "path": recorded, "mode": mode, **entry})
    return entries


def _sha256_of(path: Path) -> str | None:
    try:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        return h.hexdigest()
    except FileNotFoundError:
        return None


def _destination(entry: dict[str, Any], data_path: Path | None, owns: Owns) -> Path | str:
    """Where a file goes back to, or why it is not restored."""
    recorded = entry["path"]
    if entry["origin"] == "extra":
        if not os.path.isabs(recorded):
            raise BackupError(f"manifest: extra file {recorded!r} is not an absolute path")
        return Path(recorded)
    if data_path is None:
        return "not restored: the target store has no data folder (PostgreSQL)"
    parts = recorded.split("/")
    if any(p in ("", ".", "..") for p in parts) or recorded.startswith("/"):
        raise BackupError(f"manifest: data file {recorded!r} is not a path inside the data folder")
    if owns(parts[0], len(parts) > 1):
        return "not restored: the target store owns this name now (a collection or its own file)"
    return data_path.joinpath(*parts)


def restore_files(root: Path, entries: list[dict[str, Any]], data_path: Path | None, owns: Owns,
                  dry_run: bool) -> dict[str, FileChange]:
    """Put every backed-up file back (see the module doc); returns ``{"origin:path": what happened}``.

    Runs in a thread. Each file is written to a temp file beside its destination, fsynced and renamed over it,
    so a crash leaves the old or the new file. Files are compared by sha256 first: an equal file is not touched.
    """
    report: dict[str, FileChange] = {}
    for entry in entries:
        label = f"{entry['origin']}:{entry['path']}"
        where = _destination(entry, data_path, owns)
        if isinstance(where, str):
            report[label] = where
            continue
        if _sha256_of(where) == entry["sha256"]:
            report[label] = "unchanged"
            continue
        if dry_run:
            report[label] = "would be restored"
            continue
        data = read_loose_file(root, entry)
        try:
            where.parent.mkdir(parents=True, exist_ok=True)
            tmp = temp_name(where)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, int(entry.get("mode", 0o600)) & 0o777)
            try:
                write_all(fd, data)
                sync_fd(fd)
            finally:
                os.close(fd)
            os.replace(tmp, where)
            fsync_dir(where.parent)
        except OSError as exc:
            raise BackupError(f"restoring {where} failed ({exc}); the data itself was restored") from exc
        report[label] = "restored"
    return report
