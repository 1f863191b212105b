"""The facility registry: users, their tokens, and the sessions each user may see.

One SQLite file, ``ROOT/server.sqlite``, written only by the admin command (``cryolive serve-admin``) and read
by the server. Tokens are random (256 bits), shown once when issued and stored only as their SHA-256 hash, with
an expiry time; a token is refused after it expires or once revoked. Sessions are registered by an
administrator (an id mapped to a session folder ``OUT/`` holding ``session.sqlite``); a client only ever names a
session by its id, never by a path.

Example::

    reg = Registry("/facility")
    reg.add_user("alice")
    token = reg.issue_token("alice", days=30)          # give this to alice; only its hash is kept
    reg.add_session("krios1-2026-11-24", "/data/krios1/run7/out", owner="alice")
    reg.authenticate(token)                            # -> "alice"
    reg.session_for_user("alice", "krios1-2026-11-24") # -> SessionRecord(...)
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REGISTRY_FILE = "server.sqlite"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # user names and session ids
TOKEN_PREFIX = "cl_"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY,
    created REAL NOT NULL,
    disabled INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS tokens (
    hash TEXT PRIMARY KEY,
    user TEXT NOT NULL REFERENCES users(name),
    label TEXT,
    created REAL NOT NULL,
    expires REAL NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    out_dir TEXT NOT NULL,
    title TEXT,
    owner TEXT NOT NULL REFERENCES users(name),
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS grants (
    session_id TEXT NOT NULL REFERENCES sessions(id),
    user TEXT NOT NULL REFERENCES users(name),
    PRIMARY KEY (session_id, user)
);
"""


class RegistryError(ValueError):
    """A bad admin request (unknown user, bad name, missing session folder...), with the reason."""


@dataclass(frozen=True)
class SessionRecord:
    id: str
    out_dir: str
    title: str
    owner: str
    created: float


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise RegistryError(f"bad {kind} {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a "
                            "letter or digit")
    return name


class Registry:
    """Users, tokens and sessions of one facility root (``root/server.sqlite``)."""

    def __init__(self, root: str | os.PathLike, create: bool = True):
        self.root = Path(root).resolve()
        path = self.root / REGISTRY_FILE
        if not create and not path.is_file():
            raise RegistryError(f"no registry at {path}: create users and sessions with 'cryolive serve-admin'")
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, timeout=30.0, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
        try:
            os.chmod(path, 0o600)
        except OSError:
            pass

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _q(self, sql: str, args=()):
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # ------------------------------------------------------------------ users
    def add_user(self, name: str) -> None:
        check_name("user name", name)
        with self._lock:
            if self._db.execute("SELECT 1 FROM users WHERE name=?", (name,)).fetchone():
                raise RegistryError(f"user {name!r} exists already")
            self._db.execute("INSERT INTO users (name, created) VALUES (?, ?)", (name, time.time()))

    def users(self) -> list[str]:
        return [r["name"] for r in self._q("SELECT name FROM users ORDER BY name")]

    def set_disabled(self, name: str, disabled: bool = True) -> None:
        self._require_user(name)
        self._q("UPDATE users SET disabled=? WHERE name=?", (int(disabled), name))

    def _require_user(self, name: str) -> None:
        if not self._q("SELECT 1 FROM users WHERE name=?", (name,)):
            raise RegistryError(f"no user {name!r} (add it with 'cryolive serve-admin add-user')")

    # ------------------------------------------------------------------ tokens
    def issue_token(self, user: str, days: float = 30.0, label: str = "") -> str:
        """A new token for ``user`` valid ``days`` days; returned once, stored only as its hash."""
        self._require_user(user)
        if not days > 0:
            raise RegistryError("a token must be valid for a positive number of days")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = time.time()
        self._q("INSERT INTO tokens (hash, user, label, created, expires) VALUES (?, ?, ?, ?, ?)",
                (hash_token(token), user, label, now, now + days * 86400.0))
        return token

    def revoke_tokens(self, user: str) -> int:
        self._require_user(user)
        with self._lock:
            return self._db.execute("UPDATE tokens SET revoked=1 WHERE user=? AND revoked=0", (user,)).rowcount

    def authenticate(self, token: str | None) -> str | None:
        """The user a token belongs to, or None (unknown, expired, revoked, or the user is disabled)."""
        if not token or len(token) > 200:
            return None
        rows = self._q("SELECT t.user, t.expires, t.revoked, u.disabled FROM tokens t JOIN users u ON u.name=t.user "
                       "WHERE t.hash=?", (hash_token(token),))
        if not rows:
            return None
        r = rows[0]
        if r["revoked"] or r["disabled"] or r["expires"] <= time.time():
            return None
        return str(r["user"])

    # ------------------------------------------------------------------ sessions
    def add_session(self, session_id: str, out_dir: str | os.PathLike, owner: str, title: str = "") -> SessionRecord:
        """Register a session folder (it must hold ``session.sqlite``) under an id, owned by ``owner``."""
        check_name("session id", session_id)
        self._require_user(owner)
        out = Path(out_dir).resolve()
        if not (out / "session.sqlite").is_file():
            raise RegistryError(f"{out} is not a session folder (no session.sqlite)")
        with self._lock:
            if self._db.execute("SELECT 1 FROM sessions WHERE id=?", (session_id,)).fetchone():
                raise RegistryError(f"session id {session_id!r} is taken")
            self._db.execute("INSERT INTO sessions (id, out_dir, title, owner, created) VALUES (?, ?, ?, ?, ?)",
                             (session_id, str(out), title or session_id, owner, time.time()))
        return self.session(session_id)

    def remove_session(self, session_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM grants WHERE session_id=?", (session_id,))
            self._db.execute("DELETE FROM sessions WHERE id=?", (session_id,))

    def grant(self, session_id: str, user: str) -> None:
        """Let ``user`` see a session besides its owner."""
        self._require_user(user)
        if self.session(session_id) is None:
            raise RegistryError(f"no session {session_id!r}")
        self._q("INSERT OR IGNORE INTO grants (session_id, user) VALUES (?, ?)", (session_id, user))

    def session(self, session_id: str) -> SessionRecord | None:
        rows = self._q("SELECT * FROM sessions WHERE id=?", (session_id,))
        return SessionRecord(**dict(rows[0])) if rows else None

    def sessions(self) -> list[SessionRecord]:
        return [SessionRecord(**dict(r)) for r in self._q("SELECT * FROM sessions ORDER BY created, id")]

    def sessions_for_user(self, user: str) -> list[SessionRecord]:
        rows = self._q("SELECT s.* FROM sessions s WHERE s.owner=? OR EXISTS (SELECT 1 FROM grants g WHERE "
                       "g.session_id=s.id AND g.user=?) ORDER BY s.created, s.id", (user, user))
        return [SessionRecord(**dict(r)) for r in rows]

    def session_for_user(self, user: str, session_id: str) -> SessionRecord | None:
        """The session if ``user`` may see it, else None (unknown and forbidden look the same)."""
        if not isinstance(session_id, str) or not NAME_RE.match(session_id):
            return None
        rows = self._q("SELECT s.* FROM sessions s WHERE s.id=? AND (s.owner=? OR EXISTS (SELECT 1 FROM grants g "
                       "WHERE g.session_id=s.id AND g.user=?))", (session_id, user, user))
        return SessionRecord(**dict(rows[0])) if rows else None
