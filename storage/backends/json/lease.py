"""Keeping the store lock across back-to-back commits (a *lease*), and giving it up in time.

Why: taking the cross-process lock for a commit costs two ``flock`` calls, a ``stat`` (is ``storage.lock`` still the
file we locked), a catch-up with the journal (a ``pread``), two ``lstat`` (a restore's or a forget's intent) and,
after the commit, two more ``flock``: about 15 us of a lone save that costs 60-70 us in all with its fsync (issue
15: SQLite WAL FULL takes 72 us here). A writer saving in a loop pays it for every save. While a store holds the
lock nobody else can commit, so none of that can change between two of its commits: a commit that finds the lock
still leased to its store skips all of it. Several writer processes gain too: each keeps the lock for a run of
commits, and the next holder catches up with a run of records at once, instead of the lock (and the catch-up)
passing on at every commit.

What a lease is: after a commit (group_commit.py's lone commit or a leader's round) that followed the previous one
within :data:`BUDGET`, or that had to wait for another process's lease first (:meth:`Lease.begin`), the lock is
not let go; the next commit *resumes* it. Only commits lease: any other use of
the lock (a transaction, a compaction, a restore, a message write) ends the lease first and takes the lock the
usual way, with every check (a restore's intent is only ever written by such a user).

It ends, and the lock is let go:

* at the next turn of the event loop (the store schedules :meth:`Lease.turned`), unless the lease is *hot*: its
  run (commits that each asked for the lock within :data:`BUDGET` of the previous one's end, across leases) has
  reached :data:`RUN` commits, the last one less than :data:`BUDGET` ago. A bot's handler that saves
  once or twice lets go as soon as it awaits anything else, as without a lease; a writer saving in a loop keeps
  it across the turns that group_commit.py's lone writer gives the loop every SOLO_TURN_BUDGET (2 ms), which used
  to end every lease after 2 ms;
* at the end of a commit, once the lease is older than :data:`HOLD` and another writer waits (json/lock.py: the
  waiter's sign, one ``F_OFD_GETLK``), and then the store *steps back*: its next commit waits for the lock in the
  kernel's queue like any other writer, instead of taking it back before the woken waiter runs;
* :data:`BUDGET` after the last commit, by a keeper thread, when the lease is idle (the loop did not turn, or the
  lease was hot when it did: another process's writer waits no longer than that for an idle lease);
* before any other use of the lock, and at close.

Why :data:`HOLD` is 35 ms (issue 15, benchmarks/bench_peers.py's 4-writer row): each hand-over costs far more
than the lock itself. The waiter's thread and then its event loop must be woken (two OS wake-ups, ~0.35 ms in
all), it catches up with the records the others wrote (or defers that, json/holding.py), and its first fsyncs
are slower: on these 2-core hosts the CPU the writer that let go spends just after (its next save's way into the
wait, a deferred commit's apply) is paid by the new holder's fsync (the first append of a hold ~2.5x a later one,
the second ~1.7x: benchmarks/bench_handover_fsync.py). About 1 ms a hand-over: with 2 ms leases four writers
together made half of one writer's rate; 10 ms left it a tenth of each lease (0.8-0.96x SQLite FULL); 35 ms
made the row about 6% faster than 10 ms on a quiet disk (medians of five interleaved runs: +10, +7, +3, -1, +13%;
25 ms +3%, 50 ms +6-7%; never deferring the catch-up at 35 ms +1%, with twice the waits; benchmarks/README.md).
The price is the wait: a writer that finds the lock leased waits for the holder's lease to end, at most
:data:`HOLD` plus one commit (and the step-back of one holder, json/lock.py), and behind each other writer that
wins the lock before it: with ``N`` processes saving without pause, up to about ``(N - 1) x HOLD`` (~100 ms with
four; the slowest of four writers' longest save measured 41-79 ms, against 22-38 ms with 10 ms leases; SQLite's
busy handler left one of its four writers waiting 2.0-2.2 s in every repetition, on a quiet disk too). Only
writers saving back to back see it: a lone save's lease ends at the loop's next turn. ``flock`` is not fair, so
that is a typical bound, not a guarantee; a holder that sees a waiter always lets go within :data:`HOLD` of
taking the lock, and steps back after, so no writer keeps the lock from the others.
Every waiter gives the sign, an open polling for the lock included (json/lock.py): a hot lease that saw none
would last as long as its writer keeps saving.

Nothing else changes: every commit is still fsynced before it is acknowledged and published (readers in other
processes follow the published committed end, json/lock.py); a process killed while it holds a lease loses only
what it never acknowledged, and the kernel releases its locks. Where a waiter cannot be seen (no OFD locks, or a
folder that cannot be locked: there the sidecar's ``flock`` alone excludes writers, and a deleted ``storage.lock``
must be noticed at every acquisition), no lease is taken.
"""

from __future__ import annotations

import logging
import threading
import time

from .lock import SidecarLock

__all__ = ["Lease", "BUDGET", "HOLD", "RUN"]

log = logging.getLogger("storage.json")

#: How long an idle lease lasts when the loop does not turn (or a hot lease lasts after its last commit), and how
#: soon after the previous commit's end a commit must ask for the lock to be part of a run of them.
BUDGET = 0.002
#: How long a lease may last while another writer waits (see the module doc: about ten hand-overs' cost).
HOLD = 0.035
#: A lease whose run reached this many commits is *hot*: the loop's turn no longer ends it (see the module doc).
RUN = 3
#: The keeper thread ends after this long without a lease (the next lease starts it again).
KEEPER_IDLE = 5.0

_IDLE, _LEASED, _BUSY = 0, 1, 2


class Lease:
    """The lease of one store's lock (see the module doc). The store's event loop calls :meth:`resume`,
    :meth:`begin`, :meth:`finish` and :meth:`end`, always holding its own mutex (so at most one commit runs);
    the keeper thread only ever lets go of an idle lease. Every change of state happens under ``_guard``."""

    __slots__ = ("_guard", "_guard_lock", "_keeper", "_keeper_waits", "_lock", "_runs", "_since", "_state", "_until",
                 "closed", "contended", "last_end", "yielded")

    def __init__(self, lock: SidecarLock) -> None:
        self._lock = lock
        #: ``with self._guard_lock`` is ``with self._guard`` without Condition's Python-level __enter__/__exit__
        #: (0.2 us of each commit: resume and finish take it)
        self._guard_lock = threading.Lock()
        self._guard = threading.Condition(self._guard_lock)
        self._state = _IDLE
        self._since = 0.0  # when the current lease started (or was renewed: nobody waited at the budget)
        self._until = 0.0  # when an idle lease ends if the loop does not turn
        self._keeper: threading.Thread | None = None
        self._keeper_waits = False  # the keeper waits without a deadline: tell it of a new lease
        #: When the last commit ended (monotonic): a commit that starts within BUDGET of it may lease.
        self.last_end = -BUDGET
        #: The last lease ended with a writer waiting: the next acquisition waits its turn (see the module doc).
        self.yielded = False
        #: The last acquisition had to wait for another process: its commit leases whatever the gap since ours.
        self.contended = False
        self.closed = False
        self._runs = 0  # commits of the current run (each asked for the lock within BUDGET of the last one's end)

    @property
    def held(self) -> bool:
        """Whether the lock is leased and idle (no commit running)."""
        return self._state == _LEASED

    def resume(self) -> bool:
        """A commit starts: True, and it holds the lock, when a lease was still on (no acquisition, no checks)."""
        if self._state != _LEASED:
            return False
        with self._guard_lock:
            if self._state != _LEASED:  # the keeper let go just now
                return False
            self._state = _BUSY
            return True

    def begin(self, asked: float) -> None:
        """A commit took the lock the usual way, having asked for it at ``asked`` (monotonic): if that was within
        BUDGET of the previous commit's end (a run of commits, however long it then waited for the lock), or it
        had to wait for another process's lease (:attr:`contended`), the lock may stay leased when it ends (see
        :meth:`finish`), for up to HOLD while others wait.

        Why the second: on a loaded machine a writer saving in a loop is now and then descheduled for longer than
        BUDGET between two saves; its next commit then counted as a lone one and let go at once, and the writer
        waited behind the three other writers' leases again for one save (measured: half of all leases carried
        one or two commits). Leasing costs a lone save little: its lease ends at the loop's next turn."""
        if asked - self.last_end >= BUDGET:
            self._runs = 0  # not a run: it starts afresh with this commit
            if not self.contended:
                return
        self._state = _BUSY
        self._since = time.monotonic()

    def finish(self, keep: bool) -> bool:
        """A commit ends (the caller still holds the lock): keep it leased, and True (the caller then schedules
        :meth:`turned` for the loop's next turn), or let go. ``keep``: the commit succeeded."""
        now = time.monotonic()
        self.last_end = now
        self._runs += 1
        if self._state != _BUSY:
            return False  # not a run of commits: let go as without a lease (the caller does)
        with self._guard_lock:
            if keep and not self.closed and self._lock.can_sign and (
                    now - self._since < HOLD or not self._waited_for()):
                if now - self._since >= HOLD:
                    self._since = now  # nobody waited: a new budget
                self._state = _LEASED
                self._until = now + BUDGET
                if self._keeper is None:
                    self._keeper = threading.Thread(target=self._keep, name="storage-lease", daemon=True)
                    self._keeper.start()
                elif self._keeper_waits:
                    # once: the keeper may not run (it needs the GIL) before the next commits, which would each
                    # notify again (a Python-level notify, about 1 us, on a third of the saves in a loop)
                    self._keeper_waits = False
                    self._guard.notify()
                return True
            self._state = _IDLE
        return False

    def _waited_for(self) -> bool:
        waited = self._lock.waited_for()
        if waited:
            self.yielded = True
        return waited

    def turned(self) -> None:
        """The event loop turned (the store scheduled this at the end of a leased commit): let go, unless the lease
        is hot (see the module doc); the keeper ends a hot lease that then sits idle for BUDGET."""
        if self._state == _LEASED and not (self._runs >= RUN and time.monotonic() - self.last_end < BUDGET):
            self.end()

    def end(self) -> None:
        """Let go of an idle lease now (the loop turned, another use of the lock, close)."""
        if self._state != _LEASED:
            return
        with self._guard:
            if self._state == _LEASED:
                self._let_go()

    def close(self) -> None:
        """At close: let go and stop the keeper. Thread-safe (a store may be closed from another loop)."""
        with self._guard:
            self.closed = True
            if self._state == _LEASED:
                self._let_go()
            self._guard.notify()

    def _let_go(self) -> None:
        """Under ``_guard``, the lease idle: release the lock, and only then say so.

        The order matters: :meth:`resume` reads the state without the guard, and a commit that finds the lease
        over takes the lock with ``flock`` on the same descriptor, which succeeds at once while the descriptor still
        holds it. Were the state idle before the unlock (the keeper thread here, between the two, in a syscall that
        lets the loop's thread run), the keeper's unlock would then take the lock from under that commit. While the
        state still says leased, :meth:`resume` waits for the guard instead."""
        try:
            self._waited_for()
            self._lock.release()
        except OSError as exc:  # an unlock refused: nothing to undo (closing the descriptor releases it at the end)
            log.error("%s: letting go of the store lock failed: %s", self._lock.path, exc)
        finally:
            self._state = _IDLE

    def _keep(self) -> None:
        """The keeper thread: lets go of a lease idle for BUDGET (the loop did not turn to end it)."""
        guard = self._guard
        with guard:
            try:
                while not self.closed:
                    if self._state == _LEASED:
                        left = self._until - time.monotonic()
                        if left <= 0:
                            self._let_go()
                        else:
                            guard.wait(left)
                    elif self._state == _BUSY:
                        guard.wait(BUDGET)  # a commit runs: look again after it (no notify per commit)
                    else:
                        self._keeper_waits = True
                        woken = guard.wait(KEEPER_IDLE)
                        self._keeper_waits = False
                        if not woken and self._state == _IDLE:
                            break  # no lease for a while: end; the next lease starts a keeper again
            finally:
                self._keeper = None
