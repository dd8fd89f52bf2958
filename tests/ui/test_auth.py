"""Users with scrypt-hashed passwords, signed session cookies, CSRF tokens and login throttling."""

from __future__ import annotations

import os
import stat

import pytest

from lineguard.ui.auth import AuthError, LoginThrottle, Sessions, Users, add_user, hash_password, load_session_key


def test_a_user_added_to_the_file_logs_in_with_that_password_only(tmp_path):
    users_file = tmp_path / "users"
    add_user(users_file, "anna", "correct horse")
    add_user(users_file, "ben", "battery staple")
    add_user(users_file, "anna", "new password")  # replaced, not duplicated
    assert stat.S_IMODE(os.stat(users_file).st_mode) == 0o600
    assert users_file.read_text().count("anna:") == 1
    users = Users(users_file)
    assert users.check("anna", "new password") and users.check("ben", "battery staple")
    assert not users.check("anna", "correct horse")
    assert not users.check("carl", "new password")
    assert "new password" not in users_file.read_text()


def test_two_hashes_of_one_password_differ_by_their_salt():
    assert hash_password("same") != hash_password("same")


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("anna:plain-text", "expected name:scrypt"),
        ("anna:scrypt$16384$8$1$!!$!!", "unreadable"),
        ("anna:scrypt$1000$8$1$AAAA$" + "A" * 44, "out of range"),
        ("an na:scrypt$16384$8$1$AAAA$AAAA", "user name"),
    ],
)
def test_a_malformed_users_file_names_the_line_and_the_fix(tmp_path, line, fragment):
    users_file = tmp_path / "users"
    users_file.write_text(f"# comment\n{line}\n")
    with pytest.raises(AuthError, match=rf"users:2: .*{fragment}"):
        Users(users_file)


def test_a_missing_users_file_says_how_to_make_one(tmp_path):
    with pytest.raises(AuthError, match="add-user"):
        Users(tmp_path / "nope")


def test_session_cookies_are_signed_expire_and_carry_their_own_csrf_token(tmp_path):
    key = load_session_key(tmp_path / "session.key")
    assert load_session_key(tmp_path / "session.key") == key  # made once, kept
    sessions = Sessions(key, lifetime_s=60)
    cookie = sessions.issue("anna", now=1000.0)
    assert sessions.user(cookie, now=1030.0) == "anna"
    assert sessions.user(cookie, now=1061.0) is None  # expired
    assert sessions.user(cookie.replace("anna", "root"), now=1030.0) is None  # forged
    other = Sessions(b"x" * 32, lifetime_s=60)
    assert other.user(cookie, now=1030.0) is None  # another dashboard's key
    token = sessions.csrf_token(cookie)
    assert sessions.check_csrf(cookie, token)
    assert not sessions.check_csrf(cookie, "") and not sessions.check_csrf(sessions.issue("ben", 1000.0), token)


def test_a_damaged_session_key_is_refused_with_the_fix(tmp_path):
    (tmp_path / "session.key").write_bytes(b"short")
    with pytest.raises(AuthError, match="delete it"):
        load_session_key(tmp_path / "session.key")


def test_logins_from_one_address_are_throttled_after_repeated_failures():
    throttle = LoginThrottle(max_failures=3)
    for _ in range(3):
        assert not throttle.blocked("10.0.0.9", now=100.0)
        throttle.failed("10.0.0.9", now=100.0)
    assert throttle.blocked("10.0.0.9", now=101.0)
    assert not throttle.blocked("10.0.0.8", now=101.0)
    assert not throttle.blocked("10.0.0.9", now=100.0 + 601)  # the window passed
