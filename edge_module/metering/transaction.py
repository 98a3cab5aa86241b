"""One write transaction on the ledger's SQLite connection, done right (any thread).

Every ledger write goes through ``write_transaction`` so that a failure is
handled the same way everywhere:

* ``BEGIN IMMEDIATE`` ... ``COMMIT``; on any error SQLite may already have
  rolled the transaction back by itself (``SQLITE_FULL`` during ``COMMIT``
  does that), so ``ROLLBACK`` is sent only while ``conn.in_transaction`` says
  a transaction is still open, and an error of the rollback itself never
  hides the real cause (``database or disk is full``): it is logged and the
  original error is raised.
* ``on_failure`` runs after every failed transaction, whatever raised: the
  caller drops caches that belonged to the failed transaction there (such as
  a meter id inserted by it) and gives back admission reservations.

It mirrors sqlite-utils' ``atomic()`` handling but keeps ``BEGIN IMMEDIATE``
(the write lock is taken at the start, so a busy database fails before any
work, not at commit).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from edge_module.logs import get_logger

log = get_logger("ledger")


def _close_failed(conn: sqlite3.Connection) -> None:
    if not conn.in_transaction:
        return  # SQLite already rolled back (e.g. SQLITE_FULL at COMMIT)
    try:
        conn.execute("ROLLBACK")
    except sqlite3.Error as exc:  # never let this replace the real cause
        log.warning("ledger_rollback_failed", error=str(exc),
                    effect="the transaction is abandoned; SQLite rolls it back when the "
                    "connection is next used", fix="none needed; see the error logged with it")


@contextmanager
def write_transaction(conn: sqlite3.Connection,
                      on_failure: Callable[[], None] | None = None
                      ) -> Iterator[sqlite3.Connection]:
    """``with write_transaction(conn, on_failure) as c: c.execute(...)``: committed when
    the block ends, rolled back (once, if still open) when it raises."""
    try:
        if conn.in_transaction:  # a transaction left open by an earlier failure
            _close_failed(conn)
        conn.execute("BEGIN IMMEDIATE")
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        _close_failed(conn)
        if on_failure is not None:
            on_failure()
        raise


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk (or the ledger's quota) ran out of space."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        if code == sqlite3.SQLITE_FULL:
            return True
        return "database or disk is full" in str(exc)
    return isinstance(exc, OSError) and exc.errno == 28
