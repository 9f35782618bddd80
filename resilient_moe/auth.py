"""The cluster secret, and how a connection proves it.

DESIGN.md: every control, datapath and KV-store connection proves the cluster secret at handshake, and
the secret never appears on a command line.

Where the secret lives. The launcher makes one per cluster (`new_secret`, 32 random bytes) and calls
`install` before it starts anything. `install` keeps it in this process and exports it, hex, in the
environment variable `SECRET_ENV`, which children started by fork or exec inherit and which only the
same user (and root) can read in /proc/PID/environ, unlike a command line. A process that was not
started by the launcher (a Ray actor, a tool) gets it handed over and calls `install` itself; `secret()`
raises `AuthError` when there is none, so a component never silently runs unauthenticated.

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
import os
import secrets
import threading
import time
from dataclasses import dataclass

from resilient_moe.errors import ResilientMoeError

SECRET_ENV = "RESILIENT_MOE_CLUSTER_SECRET"
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
    """Make `secret` (bytes, or its hex) this process's cluster secret, and its children's."""
    global _secret
    value = _parse(secret)
    _secret = value
    os.environ[SECRET_ENV] = value.hex()
    return value


def ensure_secret() -> bytes:
    """The installed secret, or a new one installed now: what a launcher calls before it starts anything
    (a process that launches several clusters, such as a test session, gives them all one secret)."""
    return secret() if has_secret() else install(new_secret())


def secret() -> bytes:
    """This process's cluster secret: installed, or inherited through the environment."""
    global _secret
    if _secret is None:
        text = os.environ.get(SECRET_ENV)
        if not text:
            raise AuthError(f"no cluster secret: this process was not started by a launcher and {SECRET_ENV} is unset")
        _secret = _parse(text)
    return _secret


def has_secret() -> bool:
    return _secret is not None or bool(os.environ.get(SECRET_ENV))


def forget() -> None:
    """Drop the secret from this process and its environment (tests; a tool done with a cluster)."""
    global _secret
    _secret = None
    os.environ.pop(SECRET_ENV, None)


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
