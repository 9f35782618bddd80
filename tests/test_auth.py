"""Pure logic of resilient_moe.auth: proofs accept the secret's holder and refuse everyone else."""

import json
import os
import subprocess
import sys

import pytest

from resilient_moe import auth


@pytest.fixture
def key():
    return auth.new_secret()


def test_credential_accepted_once(key):
    verifier = auth.Verifier("link", key=key)
    cred = auth.Credential.make("link", "aw-0", key=key)
    verifier.verify(cred, "aw-0")
    before = auth.REFUSED["link"]
    with pytest.raises(auth.AuthError, match="replayed"):
        verifier.verify(cred, "aw-0")
    assert auth.REFUSED["link"] == before + 1


def test_wrong_secret_context_or_purpose_refused(key):
    verifier = auth.Verifier("link", key=key)
    with pytest.raises(auth.AuthError, match="wrong credential"):
        verifier.verify(auth.Credential.make("link", "aw-0", key=auth.new_secret()), "aw-0")
    with pytest.raises(auth.AuthError, match="wrong credential"):
        verifier.verify(auth.Credential.make("link", "aw-1", key=key), "aw-0")
    with pytest.raises(auth.AuthError, match="wrong credential"):
        verifier.verify(auth.Credential.make("grpc", "aw-0", key=key), "aw-0")
    with pytest.raises(auth.AuthError, match="no credential"):
        verifier.verify(None, "aw-0")


def test_stale_credential_refused(key):
    verifier = auth.Verifier("grpc", window_s=5, key=key)
    cred = auth.Credential.make("grpc", "/m", key=key)
    old = auth.Credential(cred.ts - 60, cred.nonce, cred.mac)
    with pytest.raises(auth.AuthError, match="off this clock"):
        verifier.verify(old, "/m")


def test_round_trips_and_malformed(key):
    cred = auth.Credential.make("grpc", "/m", key=key)
    assert auth.Credential.from_header(cred.to_header()) == cred
    assert auth.Credential.from_json(cred.to_json()) == cred
    for bad in ("", "a:b", "x:y:z"):
        with pytest.raises(auth.AuthError, match="malformed"):
            auth.Credential.from_header(bad)
    for bad in (None, [], {"ts": "1", "nonce": "n", "mac": "m"}, {"ts": True, "nonce": "n", "mac": "m"}):
        with pytest.raises(auth.AuthError):
            auth.Credential.from_json(bad)


def test_mutual_answer(key):
    cred = auth.Credential.make("kv-store", "aw-0", key=key)
    auth.check_answer(cred, auth.answer(cred, "kv-store", "aw-0", key=key), "kv-store", "aw-0", key=key)
    with pytest.raises(auth.AuthError, match="did not prove"):
        auth.check_answer(cred, auth.answer(cred, "kv-store", "aw-0", key=auth.new_secret()), "kv-store", "aw-0", key=key)
    with pytest.raises(auth.AuthError):
        auth.check_answer(cred, None, "kv-store", "aw-0", key=key)


def test_install_keeps_the_secret_in_memory_and_a_tool_loads_it(monkeypatch, tmp_path):
    session = auth.secret() if auth.has_secret() else None  # conftest's, for the tests after this one
    monkeypatch.delenv(auth.SECRET_ENV, raising=False)
    monkeypatch.delenv(auth.SECRET_FILE_ENV, raising=False)
    auth.forget()
    try:
        _install_and_forget(monkeypatch, tmp_path)
    finally:
        auth.forget()
        if session is not None:
            auth.install(session)


def _install_and_forget(monkeypatch, tmp_path):
    with pytest.raises(auth.AuthError, match="no cluster secret"):
        auth.secret()
    value = auth.install(auth.new_secret())
    assert auth.SECRET_ENV not in os.environ  # never exported: children and /proc/PID/environ see nothing
    # A tool: the hex in its own environment, or a 0600 file (refused when others may read it).
    auth._secret = None
    monkeypatch.setenv(auth.SECRET_ENV, value.hex())
    assert auth.has_secret() and auth.secret() == value
    monkeypatch.delenv(auth.SECRET_ENV)
    auth.install(value)
    path = auth.write_secret_file(str(tmp_path / "secret"))
    assert os.stat(path).st_mode & 0o777 == 0o600
    auth._secret = None
    monkeypatch.setenv(auth.SECRET_FILE_ENV, path)
    assert auth.secret() == value
    handover = tmp_path / "serve-host-8000.json"  # serve's hand-over file serves as well
    handover.write_text(json.dumps({"secret": value.hex(), "port": 8000}))
    handover.chmod(0o600)
    auth._secret = None
    monkeypatch.setenv(auth.SECRET_FILE_ENV, str(handover))
    assert auth.secret() == value
    auth._secret = None
    monkeypatch.setenv(auth.SECRET_FILE_ENV, path)
    os.chmod(path, 0o644)
    auth._secret = None
    with pytest.raises(auth.AuthError, match="not readable by others"):
        auth.secret()
    auth.forget()
    with pytest.raises(auth.AuthError, match="too short"):
        auth.install(b"short")
    with pytest.raises(auth.AuthError, match="not hex"):
        auth.install("zz" * 20)


HANDOVER_CHILD = """
import os, sys
from resilient_moe import auth
auth.receive_handover()
with open(f"/proc/{os.getpid()}/environ", "rb") as f:
    block = f.read()
print(auth.secret().hex(), auth.HANDOVER_FD_ENV in os.environ, (auth.SECRET_ENV + "=").encode() in block)
"""


def test_an_execd_child_gets_the_secret_through_a_pipe_not_its_environment(monkeypatch):
    session = auth.secret() if auth.has_secret() else None
    value = auth.install(auth.new_secret())
    monkeypatch.setenv(auth.SECRET_ENV, "ab" * 32)  # a tool's variable in our own environment: not passed on
    try:
        fd = auth.handover_fd()
        try:
            env = auth.child_env(fd)
            assert auth.SECRET_ENV not in env and env[auth.HANDOVER_FD_ENV] == str(fd)
            out = subprocess.run([sys.executable, "-c", HANDOVER_CHILD], env=env, pass_fds=[fd], capture_output=True,
                                 text=True, timeout=60)
        finally:
            os.close(fd)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == [value.hex(), "False", "False"]
        assert value.hex() not in str(env)
    finally:
        auth.forget()
        if session is not None:
            auth.install(session)


def test_verifier_forgets_nonces_once_they_cannot_be_replayed(key, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(auth.time, "time", lambda: now[0])
    verifier = auth.Verifier("grpc", window_s=5, key=key)
    for i in range(100):
        verifier.verify(auth.Credential.make("grpc", "/m", key=key), "/m")
    assert len(verifier._seen) == 100
    now[0] += 11  # past 2 windows: every one of them is stale now, so none needs remembering
    verifier.verify(auth.Credential.make("grpc", "/m", key=key), "/m")
    assert len(verifier._seen) == len(verifier._expiry) == 1


def test_refusals_are_logged_at_most_once_per_interval(monkeypatch, caplog):
    import logging

    now = [5000.0]
    monkeypatch.setattr(auth.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(auth, "_last_logged", {})
    logger = logging.getLogger("test-auth")
    with caplog.at_level(logging.WARNING, logger="test-auth"):
        for _ in range(5):
            auth.refused("probe")
            auth.log_refusal(logger, "probe", "refused a probe")
        assert caplog.text.count("refused a probe") == 1
        now[0] += auth.LOG_INTERVAL_S
        auth.refused("probe")
        auth.log_refusal(logger, "probe", "refused a probe")
    assert caplog.text.count("refused a probe") == 2 and "4 more probe refusals" in caplog.text
