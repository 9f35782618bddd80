"""The cluster secret, and how a connection proves it.

DESIGN.md: every control, datapath and KV-store connection proves the cluster secret at handshake;
the secret never appears on a command line, and no role process keeps it in its environment.

Where the secret lives. The launcher makes one per cluster (`new_secret`, 32 random bytes) and calls
`install` before it starts anything. `install` keeps it in this process's memory only: it is never
exported to the environment, because /proc/PID/environ shows any process of the same user the block a
process was exec'd with (deleting a variable later does not change it), and a forked child shows its
parent's. How it reaches the processes of a cluster:

- an exec'd child of ours (the fork server, a cold role): through an inherited pipe. The parent calls
  `handover_fd()` (the read end of a pipe that already holds the secret, inheritable), passes it to the
  child and names its number in `HANDOVER_FD_ENV` of `child_env(fd)` (a number is not secret); the
  child calls `receive_handover()` first thing, which reads it, closes it and installs the secret.
  `child_env` is the environment for every process we exec: never the secret, nor a path to it.
- a forked role: a spawn request to the fork server carries it (their socketpair), the child installs it.
- a process started by someone else (a Ray actor, an adopting supervisor): it is handed over (an actor
  argument, the 0600 hand-over file) and the process calls `install`.
- a tool (the chaos tool, a benchmark, a test talking to a running cluster) is the user's own process:
  `secret()` loads it there, when nothing is installed, from the 0600 file named by `SECRET_FILE_ENV`
  (the hex, or `serve`'s hand-over file), or, hex, from `SECRET_ENV`. A launcher never sets either, and `child_env` strips both, so a role
  never has them.

`secret()` raises `AuthError` when there is none, so a component never silently runs unauthenticated.
Role processes are also non-dumpable (procs.harden_process), so the same user cannot read the secret
out of their memory, fds or environment either.

Proofs. The secret itself never travels. A prover sends a `Credential`: a timestamp, a random nonce and
HMAC-SHA256(secret, purpose | context | timestamp | nonce), where `purpose` names the kind of
connection ("link", "grpc", "kv-store") and `context` binds the proof to what it is for (the peer's
identity, the gRPC method), so a proof made for one thing is refused for another. A `Verifier` accepts
a credential only inside a time window and only once (it remembers nonces for the window), so a
recorded handshake cannot be replayed. Where the two sides talk in turns, `answer` gives the second
half of a mutual proof: the listener's HMAC over the prover's nonce.

Refusals raise `AuthError` with the reason, and are counted in `REFUSED` (by purpose) so that every
process can report them as a metric; `log_refusal` logs them at most once per `LOG_INTERVAL_S` per
purpose, so a peer retrying without the secret cannot flood a log.

Derived keys. A service that takes a password rather than a proof (the private Redis) gets
`derived_key(purpose)`: an HMAC of the secret, so the secret itself is never handed to it.
"""
from __future__ import annotations

import collections
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass

from resilient_moe.errors import ResilientMoeError

SECRET_ENV = "RESILIENT_MOE_CLUSTER_SECRET"  # a tool's secret, hex (never set by a launcher)
SECRET_FILE_ENV = "RESILIENT_MOE_CLUSTER_SECRET_FILE"  # a tool's secret: a 0600 file holding the hex
HANDOVER_FD_ENV = "RESILIENT_MOE_CLUSTER_SECRET_FD"  # an exec'd child: the fd it reads the secret from
SECRET_BYTES = 32
DEFAULT_WINDOW_S = 60.0  # how far a credential's clock may be from ours (nodes' clocks differ a little)
LOG_INTERVAL_S = 10.0  # at most one refusal log line per purpose this often

REFUSED: collections.Counter[str] = collections.Counter()  # refusals in this process, by purpose
_refused_lock = threading.Lock()
_last_logged: dict[str, tuple[float, int]] = {}  # purpose -> (when a refusal was last logged, REFUSED then)

_secret: bytes | None = None


class AuthError(ResilientMoeError, PermissionError):
    """A peer did not prove the cluster secret, or this process has none to prove."""


def new_secret() -> bytes:
    return secrets.token_bytes(SECRET_BYTES)


def install(secret: bytes | str) -> bytes:
    """Make `secret` (bytes, or its hex) this process's cluster secret (in memory only: see the module
    docstring for how a child gets it)."""
    global _secret
    value = _parse(secret)
    _secret = value
    return value


def ensure_secret() -> bytes:
    """The installed secret, or a new one installed now: what a launcher calls before it starts anything
    (a process that launches several clusters, such as a test session, gives them all one secret)."""
    return secret() if has_secret() else install(new_secret())


def secret() -> bytes:
    """This process's cluster secret: installed, or (a tool) loaded from SECRET_FILE_ENV or SECRET_ENV."""
    global _secret
    if _secret is None:
        text = _from_tool_environment()
        if not text:
            raise AuthError(f"no cluster secret: this process was not started by a launcher, and neither "
                            f"{SECRET_FILE_ENV} nor {SECRET_ENV} is set")
        _secret = _parse(text)
    return _secret


def has_secret() -> bool:
    return _secret is not None or bool(os.environ.get(SECRET_ENV) or os.environ.get(SECRET_FILE_ENV))


def forget() -> None:
    """Drop the secret from this process and its tool variables (tests; a tool done with a cluster)."""
    global _secret
    _secret = None
    os.environ.pop(SECRET_ENV, None)
    os.environ.pop(SECRET_FILE_ENV, None)


def _from_tool_environment() -> str:
    """The secret a tool was given: the file SECRET_FILE_ENV names (the hex, or `serve`'s JSON hand-over
    file; it must be ours and 0600: a file others can read is no secret), else SECRET_ENV's hex; "" when
    neither is set."""
    path = os.environ.get(SECRET_FILE_ENV)
    if path:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as e:
            raise AuthError(f"{SECRET_FILE_ENV}={path}: cannot open ({e.strerror})") from None
        with os.fdopen(fd, "r") as f:
            st = os.fstat(f.fileno())
            if st.st_uid != os.geteuid() or st.st_mode & 0o077:
                raise AuthError(f"{SECRET_FILE_ENV}={path}: must be owned by this user and not readable by "
                                f"others (mode {st.st_mode & 0o777:o}, want 600)")
            text = f.read().strip()
        if text.startswith("{"):  # a supervisor's hand-over file (supervisor.py): its "secret"
            try:
                text = str(json.loads(text)["secret"])
            except (ValueError, KeyError, TypeError):
                raise AuthError(f"{SECRET_FILE_ENV}={path}: JSON without a \"secret\"") from None
        return text
    return os.environ.get(SECRET_ENV, "")


def write_secret_file(path: str) -> str:
    """Write this process's secret (hex) to `path`, 0600, for a tool (SECRET_FILE_ENV=path)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret().hex())
    return path


# ---- hand-over to an exec'd child ---------------------------------------------------------------

def handover_fd() -> int:
    """The read end of a pipe holding this process's secret (hex), inheritable, for one exec'd child:
    pass it (`pass_fds`, or keep it open across execve), name it with `child_env(fd)`, and close it here
    once the child started. The secret (64 bytes) fits a pipe's buffer, so nothing blocks."""
    read, write = os.pipe()
    try:
        os.write(write, secret().hex().encode())
    finally:
        os.close(write)
    os.set_inheritable(read, True)
    return read


def child_env(fd: int | None = None, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a process we exec: `base` (default os.environ) without the secret or a path to
    it; with `fd` (from `handover_fd`), the number the child reads it from."""
    env = {k: v for k, v in (os.environ if base is None else base).items()
           if k not in (SECRET_ENV, SECRET_FILE_ENV, HANDOVER_FD_ENV)}
    if fd is not None:
        env[HANDOVER_FD_ENV] = str(fd)
    return env


def receive_handover() -> bool:
    """In an exec'd child, first thing: read the secret from the fd that HANDOVER_FD_ENV names, close it,
    install it. False when none was handed over (the variable unset)."""
    text = os.environ.pop(HANDOVER_FD_ENV, "")
    if not text:
        return False
    if not text.isdigit():
        raise AuthError(f"{HANDOVER_FD_ENV}={text!r}: not a file descriptor number")
    fd = int(text)
    chunks = []
    try:
        while chunk := os.read(fd, 4096):
            chunks.append(chunk)
    finally:
        os.close(fd)
    install(b"".join(chunks).decode())
    return True


def derived_key(purpose: str) -> str:
    """A key for `purpose` derived from the cluster secret (hex), e.g. the private Redis's password."""
    return _mac(secret(), "derived", purpose)


def _parse(value: bytes | str) -> bytes:
    if isinstance(value, str):
        try:
            value = bytes.fromhex(value.strip())
        except ValueError:
            raise AuthError(f"cluster secret is not hex ({len(value)} characters)") from None
    if len(value) < 16:
        raise AuthError(f"cluster secret too short: {len(value)} bytes, need at least 16")
    return bytes(value)


def _mac(key: bytes, *parts: str | bytes) -> str:
    h = hmac.new(key, digestmod=hashlib.sha256)
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(4, "big"))  # length-prefixed: no two part lists hash alike
        h.update(data)
    return h.hexdigest()


@dataclass(frozen=True)
class Credential:
    """One proof of the secret, for one purpose and context (see the module docstring)."""

    ts: float
    nonce: str
    mac: str

    @classmethod
    def make(cls, purpose: str, context: str = "", key: bytes | None = None) -> Credential:
        ts = time.time()
        nonce = secrets.token_hex(16)
        return cls(ts, nonce, _mac(key or secret(), purpose, context, repr(ts), nonce))

    def to_json(self) -> dict:
        return {"ts": self.ts, "nonce": self.nonce, "mac": self.mac}

    def to_header(self) -> str:
        return f"{self.ts!r}:{self.nonce}:{self.mac}"

    @classmethod
    def from_json(cls, data: object) -> Credential:
        if not isinstance(data, dict):
            raise AuthError("credential missing")
        ts, nonce, mac = data.get("ts"), data.get("nonce"), data.get("mac")
        if not isinstance(ts, (int, float)) or isinstance(ts, bool) or not isinstance(nonce, str) or not isinstance(mac, str):
            raise AuthError("credential malformed: needs ts (number), nonce and mac (strings)")
        return cls(float(ts), nonce, mac)

    @classmethod
    def from_header(cls, text: str) -> Credential:
        parts = text.split(":") if isinstance(text, str) else []
        if len(parts) != 3:
            raise AuthError("credential malformed: expected TS:NONCE:MAC")
        try:
            ts = float(parts[0])
        except ValueError:
            raise AuthError("credential malformed: timestamp is not a number") from None
        return cls(ts, parts[1], parts[2])


def answer(credential: Credential, purpose: str, context: str = "", key: bytes | None = None) -> str:
    """The verifier's half of a mutual proof: an HMAC over the prover's nonce, which only a holder of
    the secret can compute. The prover checks it with `check_answer`."""
    return _mac(key or secret(), "answer", purpose, context, credential.nonce)


def check_answer(credential: Credential, reply: object, purpose: str, context: str = "", key: bytes | None = None) -> None:
    expected = answer(credential, purpose, context, key)
    if not isinstance(reply, str) or not hmac.compare_digest(expected, reply):
        refused(purpose)
        raise AuthError(f"{purpose}: the peer did not prove the cluster secret")


def refused(purpose: str) -> None:
    with _refused_lock:
        REFUSED[purpose] += 1


def refusal_counts(prefix: str = "auth_refused_") -> dict[str, float]:
    """REFUSED as a load/counter map (`auth_refused_link`: 3.0, ...), for heartbeats and snapshots."""
    with _refused_lock:
        return {f"{prefix}{purpose}": float(n) for purpose, n in REFUSED.items()}


def log_refusal(logger, purpose: str, message: str) -> None:
    """Log one refused peer (already counted), unless `purpose` was logged less than LOG_INTERVAL_S ago;
    the next line says how many refusals went unlogged meanwhile."""
    now = time.monotonic()
    with _refused_lock:
        last, count_then = _last_logged.get(purpose, (-LOG_INTERVAL_S, 0))
        if now - last < LOG_INTERVAL_S:
            return
        count = REFUSED[purpose]
        _last_logged[purpose] = (now, count)
    unlogged = max(0, count - count_then - 1) if last >= 0 else 0
    logger.warning("%s%s", message, f" ({unlogged} more {purpose} refusals since the last report)" if unlogged else "")


class Verifier:
    """Checks credentials for one purpose; refuses stale, replayed and forged ones. Thread-safe."""

    def __init__(self, purpose: str, window_s: float = DEFAULT_WINDOW_S, key: bytes | None = None) -> None:
        self.purpose = purpose
        self.window_s = window_s
        self._key = key
        # Nonces seen within the window, and when each may be forgotten, oldest first: pruning is O(1)
        # per credential however many are remembered (a controller verifies every heartbeat).
        self._seen: set[str] = set()
        self._expiry: collections.deque[tuple[float, str]] = collections.deque()
        self._lock = threading.Lock()

    def verify(self, credential: Credential | None, context: str = "") -> None:
        try:
            self._verify(credential, context)
        except AuthError:
            refused(self.purpose)
            raise

    def verify_json(self, data: object, context: str = "") -> Credential:
        """Parse a credential from a handshake's JSON (None: absent) and verify it; every failure counts."""
        return self._parse_and_verify(Credential.from_json, data, context)

    def verify_header(self, text: str | None, context: str = "") -> Credential:
        """The same for a credential sent as a header value (gRPC metadata)."""
        return self._parse_and_verify(Credential.from_header, text, context)

    def _parse_and_verify(self, parse, raw: object, context: str) -> Credential:
        try:
            credential = None if raw is None else parse(raw)
        except AuthError:
            refused(self.purpose)
            raise
        self.verify(credential, context)  # None: refused as "no credential"
        return credential

    def _verify(self, credential: Credential | None, context: str) -> None:
        if credential is None:
            raise AuthError(f"{self.purpose}: no credential (the peer does not hold the cluster secret)")
        now = time.time()
        if abs(now - credential.ts) > self.window_s:
            raise AuthError(f"{self.purpose}: credential is {now - credential.ts:+.0f} s off this clock "
                            f"(allowed ±{self.window_s:.0f} s)")
        expected = _mac(self._key or secret(), self.purpose, context, repr(credential.ts), credential.nonce)
        if not hmac.compare_digest(expected, credential.mac):
            raise AuthError(f"{self.purpose}: wrong credential (the peer does not hold the cluster secret)")
        with self._lock:
            while self._expiry and self._expiry[0][0] <= now:
                self._seen.discard(self._expiry.popleft()[1])
            if credential.nonce in self._seen:
                raise AuthError(f"{self.purpose}: credential replayed")
            self._seen.add(credential.nonce)
            self._expiry.append((now + 2 * self.window_s, credential.nonce))
