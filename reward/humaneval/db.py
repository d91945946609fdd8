"""The study's SQLite database: schema, one connection per request, write transactions.

Concurrency: WAL lets readers go on while one writer holds the lock, and a writer that finds the
lock taken waits up to BUSY_TIMEOUT_MS instead of failing. Connections are in autocommit; any
read-then-write runs inside `write(conn)`, which takes the write lock first (BEGIN IMMEDIATE), so
two requests can never both read the same state and both act on it (two annotators claiming an
item's last open slot, say). With synchronous=NORMAL a commit is in the WAL file before the server
answers, so an answered vote survives a kill of the server (tested); only a power cut or an OS
crash may lose the last commits, never corrupt the file. FULL would sync at every commit: ~14 ms
each on a shared disk, a server-wide limit of ~70 votes/s.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from contextlib import contextmanager

from base_model.errors import InputError, MissingInput

BUSY_TIMEOUT_MS = 30_000

SCHEMA = """
CREATE TABLE IF NOT EXISTS study (key TEXT PRIMARY KEY, value TEXT NOT NULL);  -- JSON values
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    prompt TEXT NOT NULL,
    seed INTEGER NOT NULL,  -- the same noise for both models
    image_a TEXT NOT NULL UNIQUE,  -- file names in the study's images folder; random, so a
    image_b TEXT NOT NULL UNIQUE   -- page's image URLs never say which model drew them
);
CREATE TABLE IF NOT EXISTS annotators (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    token_sha256 TEXT NOT NULL UNIQUE,  -- the token itself is printed once and never stored
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS assignments (  -- an item shown to an annotator, with its random sides
    annotator_id INTEGER NOT NULL REFERENCES annotators(id),
    item_id INTEGER NOT NULL REFERENCES items(id),
    left_model TEXT NOT NULL CHECK (left_model IN ('A', 'B')),
    assigned_at REAL NOT NULL,
    PRIMARY KEY (annotator_id, item_id)
);
CREATE TABLE IF NOT EXISTS votes (
    annotator_id INTEGER NOT NULL,
    item_id INTEGER NOT NULL,
    question TEXT NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN ('A', 'B', 'tie')),  -- the model preferred, not the side
    first_at REAL NOT NULL,  -- the first vote's time; `at` is the latest's, which replaced it
    at REAL NOT NULL,
    changes INTEGER NOT NULL DEFAULT 0,  -- how often the choice changed
    PRIMARY KEY (annotator_id, item_id, question),
    FOREIGN KEY (annotator_id, item_id) REFERENCES assignments(annotator_id, item_id)
);
"""


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def connect(path: str) -> sqlite3.Connection:
    """A new connection in autocommit mode (transactions are explicit), WAL, busy timeout."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA journal_mode=WAL")  # stored in the file; repeating it is a no-op
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


@contextmanager
def write(conn: sqlite3.Connection):
    """BEGIN IMMEDIATE … COMMIT, rolled back on any exception."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def init(path: str) -> sqlite3.Connection:
    conn = connect(path)
    conn.executescript(SCHEMA)
    return conn


def open_study(path: str) -> sqlite3.Connection:
    """A connection to an existing study; a clear error when `path` is none."""
    if not os.path.isfile(path):
        raise MissingInput(f"--db {path!r}: the study database does not exist; make one with `create`")
    try:
        conn = sqlite3.connect(path)  # a plain look first: it writes nothing to a file that is not a database
        found = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'items'").fetchone()
        conn.close()
    except sqlite3.DatabaseError as e:
        raise InputError(f"--db {path!r} is not a study database ({e})") from e
    if found is None:
        raise InputError(f"--db {path!r} is not a study database (no items table)")
    return connect(path)


def get(conn: sqlite3.Connection, key: str):
    row = conn.execute("SELECT value FROM study WHERE key = ?", (key,)).fetchone()
    if row is None:
        raise KeyError(f"the study records no {key!r}")
    return json.loads(row["value"])


def put(conn: sqlite3.Connection, key: str, value) -> None:
    conn.execute("INSERT INTO study (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                 (key, json.dumps(value)))


def images_dir(conn: sqlite3.Connection, db_path: str) -> str:
    """The images folder, stored relative to the database's folder so a study can be moved whole."""
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(db_path)), get(conn, "images")))


def image_file(folder: str, name: str) -> str:
    """The path of image `name` in the study's images `folder`, checked: a regular file inside it,
    reached through no symlink and no '..' (the folder itself may be one). Else an InputError naming it."""
    path = os.path.realpath(folder) + os.sep + name  # not os.path.join: an absolute name must not replace the folder
    if os.path.realpath(path) != path or not os.path.isfile(path):
        raise InputError(f"image {os.path.join(folder, name)!r} is not a regular file inside the study's images "
                         f"folder {folder!r} (missing, a symlink, or outside it)")
    return path
