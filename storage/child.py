"""Pure read-only work in a child process: off the GIL the event loop needs.

A worker thread running Python holds the GIL for up to a switch interval at a time (5 ms), and on a busy host the
event loop then waits far longer than that for each turn: a 1 ms ticker beside a thread that parses or checks a
million message lines was 20-30 ms late at times (benchmarks/bench_stalls.py, benchmarks/README.md). Work that only
reads files and computes (checking a backup's messages, encoding them as ``COPY`` rows) can run with the
same code in a child interpreter on another core instead; the worker thread then waits on a pipe, the GIL released,
and takes in the results, a few C calls each. Used for a restore's message check and a PostgreSQL restore's ``COPY``
rows (backup/messages.py, postgres/copy_child.py).

:func:`child_items` runs a generator function of this package there and yields its items as they come. What may
cross: JSON-able arguments, and items :mod:`marshal` can write (core types: nothing in them can run code on
loading). The child's errors do not cross: an exception there, a child that cannot start (no interpreter to run, as
in an embedded Python) or that dies, all raise :class:`ChildLost` where the items stop, and the caller does the rest
in its own thread, which raises the real error, with its message and attributes, as before. So the child changes
where the work runs, never what it finds. The child runs at a lower priority (:data:`NICE`).
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import marshal
import os
import struct
import subprocess
import sys
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import IO, Any, Protocol, runtime_checkable

import orjson

from .offload import PACED, Pacer

__all__ = ["ChildLost", "child_items", "NICE", "serve", "Recipe"]

#: The child's niceness above the parent's: on a host whose cores are all busy, a child competing with the process
#: it works for made the event loop's wake-ups late though no thread of ours held the GIL meanwhile.
NICE = 10
_FRAME = struct.Struct("<Q")
_ITEM, _END = b"i", b"e"
_ROOT = str(Path(__file__).resolve().parents[1])  # the folder that holds this ``storage`` package
_CHILD = "import sys; sys.path.insert(0, sys.argv[1]); from storage.child import serve; serve()"


class ChildLost(Exception):
    """The child did not start, failed or died: the caller does the remaining work itself."""


@runtime_checkable
class Recipe(Protocol):
    """Record batches that a child process can read again by itself (a restore's backed-up messages), for a
    consumer that would rather have the child read and encode them: ``recipe()`` names a generator of this package
    and its JSON-able arguments that yields the same batches, ``count`` how many records they hold, ``done(n)``
    counts ``n`` records the child delivered (progress), and iterating ``after(n)`` gives the batches from record
    ``n`` on (where a lost child stopped)."""

    count: int

    def recipe(self) -> tuple[str, list[Any]]: ...

    def done(self, records: int) -> None: ...

    def after(self, records: int) -> Iterator[list[dict[str, Any]]]: ...


def child_items(target: str, *args: Any) -> Generator[Any, None, None]:
    """The items of the generator ``target`` (``"storage.module:function"``) called with ``args``, computed in a
    child process; :class:`ChildLost` where they stop early (module doc). Call it in a worker thread."""
    try:
        proc = subprocess.Popen([sys.executable, "-s", "-c", _CHILD, _ROOT], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, close_fds=True)
    except (OSError, ValueError) as exc:  # no interpreter to run, no process to spare
        raise ChildLost(f"no child process: {exc}") from exc
    assert proc.stdin is not None and proc.stdout is not None
    try:
        try:
            proc.stdin.write(orjson.dumps([target, args], default=str))
            proc.stdin.close()
        except OSError as exc:
            raise ChildLost(f"the child is gone: {exc}") from exc
        pacer = Pacer()  # each frame is a pipe read and a short ``marshal.loads``: a GIL convoy without pauses
        while True:
            pacer.tick()
            frame = _read_frame(proc.stdout)
            if frame is None or frame[:1] not in (_ITEM, _END):
                raise ChildLost("the child failed or died")
            if frame[:1] == _END:
                return
            yield marshal.loads(memoryview(frame)[1:])
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()


def _read_frame(stream: IO[bytes]) -> bytes | None:
    head = stream.read(_FRAME.size)
    if len(head) < _FRAME.size:
        return None
    (length,) = _FRAME.unpack(head)
    payload = stream.read(length)
    return payload if len(payload) == length else None


def serve() -> None:
    """The child's main: run the generator named on stdin, each item a frame on stdout, then the end frame (an
    exception ends the process without it: the parent sees the child lost)."""
    gc.disable()  # a short-lived process of ours: the work's containers are freed by reference counting
    PACED.set(False)  # no event loop here to let in (see Pacer)
    with contextlib.suppress(OSError):
        os.nice(NICE)  # background work: where the cores are all busy, the parent's event loop goes first
    target, args = orjson.loads(sys.stdin.buffer.read())
    module, name = target.split(":")
    if not module.startswith("storage."):
        raise SystemExit(2)
    out = sys.stdout.buffer
    for item in getattr(importlib.import_module(module), name)(*args):
        payload = marshal.dumps(item)
        out.write(_FRAME.pack(len(payload) + 1) + _ITEM + payload)
        out.flush()
    out.write(_FRAME.pack(1) + _END)
    out.flush()
