"""The call store: every call's turns in an embedded SQLite database (WAL mode).

Contract:
- `CallStore(path)` opens (creating) the database. All SQLite work runs in one worker thread
  that owns the connection, so the event loop never blocks on disk; the methods that enqueue work
  (`call_started`, `turn_finished`, `call_ended`) return at once.
- A turn is committed as soon as it completes (`INSERT OR REPLACE` keyed by call and turn, so a
  later correction, such as a truncation from the client, replaces the row). Killing the process
  loses nothing before the last completed turn: each turn is its own committed transaction.
- `flush()` waits until everything enqueued is on disk, `await barrier()` likewise without
  blocking the event loop (the server sends a turn's `response.done` after it); `close()`
  flushes, then closes; both are idempotent. Reading (`list_calls`, `get_call`) opens its own connection: safe while a
  server is writing, thanks to WAL.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import sqlite3
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from voice_agent.session import TurnRecord

__all__ = ["CallStore"]

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    call_id    TEXT PRIMARY KEY,
    route      TEXT NOT NULL,
    started_at REAL NOT NULL,
    ended_at   REAL,
    info       TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS turns (
    call_id    TEXT NOT NULL REFERENCES calls(call_id),
    turn_id    INTEGER NOT NULL,
    kind       TEXT NOT NULL,
    started_at REAL NOT NULL,
    user_text  TEXT NOT NULL,
    reply_text TEXT NOT NULL,
    heard      TEXT NOT NULL,
    status     TEXT NOT NULL,
    metrics    TEXT NOT NULL,
    PRIMARY KEY (call_id, turn_id)
);
"""


class CallStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One thread owns the connection; the queue of pending writes is the executor's (its
        # length is bounded by the number of turns in flight: one write per finished turn).
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="call-store")
        self._local = threading.local()
        self._closed = False
        self._executor.submit(self._connect).result()

    def _connect(self) -> None:
        conn = sqlite3.connect(self.path)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a committed turn survives a process kill
        conn.executescript(_SCHEMA)
        conn.commit()
        self._local.conn = conn

    def _submit(self, fn: Any, *args: Any) -> None:
        if self._closed:
            log.warning("call store closed; a write was not made")
            return
        future = self._executor.submit(fn, *args)
        future.add_done_callback(_log_failure)

    # --- writes (return at once) ---------------------------------------------------------------

    def call_started(self, call_id: str, route: str, info: dict[str, Any] | None = None) -> None:
        self._submit(self._write_call, call_id, route, time.time(), json.dumps(info or {}))

    def call_info(self, call_id: str, info: dict[str, Any]) -> None:
        self._submit(self._write_info, call_id, json.dumps(info))

    def turn_finished(self, call_id: str, record: TurnRecord) -> None:
        row = asdict(record)
        self._submit(self._write_turn, call_id, row)

    def call_ended(self, call_id: str) -> None:
        self._submit(self._write_end, call_id, time.time())

    def _write_call(self, call_id: str, route: str, started_at: float, info: str) -> None:
        conn = self._local.conn
        with conn:
            conn.execute(
                "INSERT OR IGNORE INTO calls (call_id, route, started_at, info) VALUES (?, ?, ?, ?)",
                (call_id, route, started_at, info),
            )

    def _write_info(self, call_id: str, info: str) -> None:
        with self._local.conn as conn:
            conn.execute("UPDATE calls SET info = ? WHERE call_id = ?", (info, call_id))

    def _write_turn(self, call_id: str, row: dict[str, Any]) -> None:
        with self._local.conn as conn:
            conn.execute(
                "INSERT OR REPLACE INTO turns (call_id, turn_id, kind, started_at, user_text, reply_text, heard, status, metrics) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    call_id,
                    row["turn_id"],
                    row["kind"],
                    row["started_at"],
                    row["user_text"],
                    row["reply_text"],
                    row["heard"],
                    row["status"],
                    json.dumps(row["metrics"]),
                ),
            )

    def _write_end(self, call_id: str, ended_at: float) -> None:
        with self._local.conn as conn:
            conn.execute("UPDATE calls SET ended_at = ? WHERE call_id = ?", (ended_at, call_id))

    # --- lifecycle -----------------------------------------------------------------------------

    def barrier(self) -> asyncio.Future[None]:
        """Awaitable: done once every write enqueued so far is committed (no thread waits)."""
        if self._closed:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            future.set_result(None)
            return future
        return asyncio.wrap_future(self._executor.submit(lambda: None))

    def flush(self) -> None:
        """Block until every write enqueued so far is committed."""
        if not self._closed:
            self._executor.submit(lambda: None).result()

    def close(self) -> None:
        if self._closed:
            return
        self.flush()
        self._closed = True

        def _close() -> None:
            self._local.conn.close()

        self._executor.submit(_close).result()
        self._executor.shutdown(wait=True)

    # --- reads (own connection) ----------------------------------------------------------------

    def list_calls(self, limit: int = 50) -> list[dict[str, Any]]:
        return list_calls(self.path, limit)


def _log_failure(future: concurrent.futures.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("call store write failed", exc_info=future.exception())


def _open_readonly(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    return conn


def list_calls(path: str | Path, limit: int = 50) -> list[dict[str, Any]]:
    """The newest calls first, with their number of turns."""
    with contextlib.closing(_open_readonly(Path(path).expanduser())) as conn:
        rows = conn.execute(
            "SELECT c.call_id, c.route, c.started_at, c.ended_at, c.info, COUNT(t.turn_id) AS turns "
            "FROM calls c LEFT JOIN turns t ON t.call_id = c.call_id "
            "GROUP BY c.call_id ORDER BY c.started_at DESC LIMIT ?",
            (limit,),
        ).fetchall()
    return [{**dict(r), "info": json.loads(r["info"])} for r in rows]


def get_call(path: str | Path, call_id: str) -> dict[str, Any] | None:
    """One call and its turns; `call_id` may be a unique prefix."""
    with contextlib.closing(_open_readonly(Path(path).expanduser())) as conn:
        calls = conn.execute("SELECT * FROM calls WHERE call_id LIKE ? || '%'", (call_id,)).fetchall()
        if len(calls) != 1:
            return None
        call = dict(calls[0])
        turns = conn.execute("SELECT * FROM turns WHERE call_id = ? ORDER BY turn_id", (call["call_id"],)).fetchall()
    call["info"] = json.loads(call["info"])
    call["turns"] = [{**dict(t), "metrics": json.loads(t["metrics"])} for t in turns]
    return call
