"""``cryolive serve-admin``: users, tokens (shown once, stored hashed, expiring), sessions registered by id."""

from __future__ import annotations

import sqlite3

import pytest
from typer.testing import CliRunner

from cryolive.cli import app
from cryolive.server.registry import REGISTRY_FILE, Registry, RegistryError, hash_token


def _run(*args):
    return CliRunner().invoke(app, list(args))


def test_admin_commands_register_users_tokens_and_sessions(facility, tmp_path):
    root = tmp_path / "root"
    assert _run("serve-admin", "add-user", "dana", "--root", str(root)).exit_code == 0
    r = _run("serve-admin", "issue-token", "dana", "--root", str(root), "--days", "2")
    assert r.exit_code == 0
    token = r.output.strip()
    assert token.startswith("cl_") and len(token) > 40
    # only the hash is stored, with an expiry about 2 days ahead
    db = sqlite3.connect(str(root / REGISTRY_FILE))
    rows = db.execute("SELECT hash, created, expires FROM tokens").fetchall()
    db.close()
    assert [r[0] for r in rows] == [hash_token(token)]
    assert token not in (root / REGISTRY_FILE).read_bytes().decode("latin-1")
    assert rows[0][2] - rows[0][1] == pytest.approx(2 * 86400, abs=5)
    alpha = facility.sessions["alpha"].out
    r = _run("serve-admin", "add-session", "run7", str(alpha), "--owner", "dana", "--root", str(root))
    assert r.exit_code == 0, r.output
    reg = Registry(root)
    assert reg.authenticate(token) == "dana"
    assert [s.id for s in reg.sessions_for_user("dana")] == ["run7"]
    assert _run("serve-admin", "revoke-tokens", "dana", "--root", str(root)).exit_code == 0
    assert reg.authenticate(token) is None
    listing = _run("serve-admin", "list", "--root", str(root)).output
    assert "dana" in listing and "run7" in listing


@pytest.mark.parametrize("args, message", [
    (("add-user", "../evil"), "bad user name"),
    (("issue-token", "nobody"), "no user 'nobody'"),
    (("add-session", "s1", "/etc", "--owner", "erin"), "not a session folder"),
    (("add-session", "../s1", "/etc", "--owner", "erin"), "bad session id"),
])
def test_admin_commands_refuse_bad_input_with_a_reason(tmp_path, args, message):
    root = tmp_path / "root"
    Registry(root).add_user("erin")
    r = _run("serve-admin", *args, "--root", str(root))
    assert r.exit_code == 2 and message in r.output


def test_serve_needs_a_registry(tmp_path):
    r = _run("serve", "--root", str(tmp_path / "nothing"))
    assert r.exit_code == 2 and "serve-admin" in r.output
    with pytest.raises(RegistryError):
        Registry(tmp_path / "nothing", create=False)
