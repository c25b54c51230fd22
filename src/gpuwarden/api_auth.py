"""Who a TCP request comes from: bearer tokens, signatures bound to the request, a
persistent replay guard, and a per-address limit on failed attempts.

A signature covers the method and the request target as well as the body, so a
request signed for one route cannot be sent to another. The signed string is
Standard Webhooks' `id.timestamp.payload`, with payload = `METHOD.TARGET.BODY`:

    {webhook-id}.{webhook-timestamp}.{METHOD}.{path?query as sent}.{body}

signed with HMAC-SHA256 under the base64-decoded `whsec_` secret, sent as
`webhook-signature: v1,<base64 digest>` (README, HTTP API).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import logging
import math
import os
import re
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from .config import ApiConfig
from .events import EventBus, Severity

__all__ = ["ApiAuth", "AuthFailures", "Identity", "ReplayGuard", "sign_request",
           "signed_string", "whsec_key"]

log = logging.getLogger(__name__)

# Standard Webhooks' tolerance is 5 minutes either way; a webhook-id is remembered
# until its timestamp is past that, with a minute's slack for clock steps.
_TOLERANCE_S = 300
_KEEP_S = _TOLERANCE_S + 60
_MAX_IDS = 100_000  # ids within one window; beyond it the oldest are forgotten
# A failure episode ends after this long without failures from the address.
_EPISODE_QUIET_S = 60.0
_MAX_CLIENTS = 10_000  # addresses tracked; quiet, refilled ones are forgotten first


def signed_string(msg_id: str, stamp: int, method: str, target: str, body: bytes) -> bytes:
    """The exact bytes a request's signature covers (module docstring)."""
    return f"{msg_id}.{stamp}.{method.upper()}.{target}.".encode() + body


def sign_request(key: bytes, msg_id: str, stamp: int, method: str, target: str,
                 body: bytes) -> str:
    """The webhook-signature header value for a request (for clients and tests)."""
    digest = hmac.new(key, signed_string(msg_id, stamp, method, target, body),
                      hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def whsec_key(secret: str) -> bytes:
    """The HMAC key of a `whsec_<base64>` secret (validated by the config)."""
    text = secret.removeprefix("whsec_")
    return base64.b64decode(text + "=" * (-len(text) % 4))


# A token allowed to (act_for) names the user it acts for here.
ON_BEHALF_HEADER = b"x-gpuwarden-on-behalf-of"
_ON_BEHALF = re.compile(r"[a-z]{1,16}:[A-Za-z0-9_.@-]{1,64}")


@dataclass(frozen=True)
class Identity:
    """Whom a request is from, for `requested_by`."""

    requested_by: str


class AuthError(Exception):
    """Authentication failed; the message is safe to show the client."""

    def __init__(self, message: str, reason: str, status: int = 401) -> None:
        super().__init__(message)
        self.reason = reason  # a short stable word, counted per episode
        self.status = status


class ReplayGuard:
    """webhook-ids seen within the tolerance window, kept in the state directory so a
    captured request cannot be replayed after a restart either."""

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._seen: OrderedDict[str, int] = OrderedDict()
        self._lock = asyncio.Lock()
        if path is not None:
            self._load(path)

    def _load(self, path: Path) -> None:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            # Fail closed would refuse every signed request forever; a corrupt file
            # is replaced at the next accepted request. Said loudly.
            log.error("replay guard %s unreadable (%s); starting empty", path, exc)
            return
        if isinstance(doc, dict):
            for msg_id, stamp in sorted(doc.items(), key=lambda kv: kv[1]):
                if isinstance(msg_id, str) and isinstance(stamp, int):
                    self._seen[msg_id] = stamp
        self._prune(int(time.time()))

    def _prune(self, now: int) -> None:
        while self._seen and (next(iter(self._seen.values())) < now - _KEEP_S
                              or len(self._seen) > _MAX_IDS):
            self._seen.popitem(last=False)

    async def claim(self, msg_id: str, stamp: int) -> bool:
        """Record msg_id; False when it was seen within the window (a replay).

        The id is on disk before this returns True, so a request that is acted on
        cannot be replayed after a crash. OSError when it cannot be recorded.
        """
        now = int(time.time())
        self._prune(now)
        if msg_id in self._seen:
            return False
        self._seen[msg_id] = max(stamp, now)  # ordered by when it may be forgotten
        self._seen.move_to_end(msg_id)
        if self._path is not None:
            try:
                async with self._lock:
                    await asyncio.to_thread(_write_atomic, self._path, dict(self._seen))
            except OSError:
                del self._seen[msg_id]
                raise
        return True


def _write_atomic(path: Path, doc: dict[str, int]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".replay-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(doc, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@dataclass
class _Client:
    """Failed attempts from one address: a token bucket and the open episode."""

    allowance: float
    updated: float
    count: int = 0  # failures in this episode
    limited: int = 0  # requests answered 429 in this episode
    first: float = 0.0  # wall clock
    last_mono: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)


class AuthFailures:
    """Failed authentications per client address: past a burst, 429 with Retry-After;
    each episode audited once (`api.auth.failed`) with its counts when it ends."""

    def __init__(self, burst: int, rate: float, bus: EventBus) -> None:
        self._burst = float(burst)
        self._rate = rate
        self._bus = bus
        self._clients: OrderedDict[str, _Client] = OrderedDict()

    def _refill(self, client: _Client, now: float) -> None:
        client.allowance = min(self._burst,
                               client.allowance + (now - client.updated) * self._rate)
        client.updated = now

    def retry_after(self, address: str) -> int | None:
        """Seconds to wait when address is over its budget, else None."""
        client = self._clients.get(address)
        if client is None:
            return None
        now = time.monotonic()
        self._refill(client, now)
        if client.allowance >= 1.0:
            return None
        client.limited += 1
        client.last_mono = now
        return max(1, math.ceil((1.0 - client.allowance) / self._rate))

    def failed(self, address: str, reason: str) -> None:
        now = time.monotonic()
        client = self._clients.get(address)
        if client is None:
            if len(self._clients) >= _MAX_CLIENTS:
                self._forget_one()
            client = _Client(allowance=self._burst, updated=now, first=time.time())
            self._clients[address] = client
        self._refill(client, now)
        client.allowance -= 1.0
        client.count += 1
        client.last_mono = now
        client.reasons[reason] = client.reasons.get(reason, 0) + 1
        self._clients.move_to_end(address)

    def _forget_one(self) -> None:
        address, client = next(iter(self._clients.items()))
        self._audit(address, client)
        del self._clients[address]

    def end_quiet_episodes(self, *, everything: bool = False) -> None:
        """Audit and forget the episodes that have been quiet long enough (all of them
        when the daemon stops)."""
        now = time.monotonic()
        for address in list(self._clients):
            client = self._clients[address]
            if everything or now - client.last_mono >= _EPISODE_QUIET_S:
                self._audit(address, client)
                del self._clients[address]

    def _audit(self, address: str, client: _Client) -> None:
        if not client.count:
            return
        self._bus.publish(
            "api.auth.failed",
            f"{client.count} failed authentication(s) from {address}"
            + (f", {client.limited} request(s) refused with 429" if client.limited else ""),
            severity=Severity.WARNING, client=address, count=client.count,
            limited=client.limited, reasons=dict(client.reasons), first_at=client.first,
            last_at=time.time() - (time.monotonic() - client.last_mono))

    def open_episodes(self) -> int:
        return sum(1 for c in self._clients.values() if c.count)


class ApiAuth:
    """Bearer tokens, compared byte for byte in constant time, and signatures."""

    def __init__(self, config: ApiConfig, replay: ReplayGuard) -> None:
        self.set_tokens(config)
        secret = config.signing_secret
        self._key = whsec_key(secret.get_secret_value()) if secret is not None else None
        self._replay = replay
        self.open_read = config.open_read
        self.metrics_auth = config.metrics_need_auth()

    def set_tokens(self, config: ApiConfig) -> None:
        """The named tokens (at start, and on a reload)."""
        self._tokens = [(name, t.token.get_secret_value().encode(), t.require_signature)
                        for name, t in config.tokens.items() if t.token is not None]
        self._act_for = {name: frozenset(t.act_for) for name, t in config.tokens.items()}

    def token_named(self, presented: bytes) -> tuple[str, bool] | None:
        """The name of the configured token `presented` is, and whether it needs a
        signature; None when it is none of them. Every token is compared."""
        found: tuple[str, bool] | None = None
        for name, token, needs_signature in self._tokens:
            if hmac.compare_digest(token, presented):
                found = (name, needs_signature)
        return found

    def fingerprint(self, name: str) -> bytes | None:
        """A digest of token `name`'s value (None: no such token now): a session the
        token granted ends when the token is changed or removed."""
        for each, token, _ in self._tokens:
            if each == name:
                return hashlib.sha256(b"gpuwarden-ui\0" + token).digest()[:16]
        return None

    def _bearer(self, header: bytes) -> tuple[str, bool]:
        """The token's name and whether it needs a signature. RFC 7235: the scheme is
        case-insensitive, then one or more spaces, then the token, taken as is."""
        scheme, sep, presented = header.partition(b" ")
        if not sep or scheme.lower() != b"bearer":
            raise AuthError("Authorization: expected 'Bearer <token>'", "scheme")
        found = self.token_named(presented.lstrip(b" "))
        if found is None:
            raise AuthError("invalid bearer token", "token")
        return found

    async def _signature(self, method: str, target: str, body: bytes,
                         headers: dict[str, str]) -> None:
        if self._key is None:
            raise AuthError("signed requests are not configured", "signature")
        msg_id = headers.get("webhook-id", "")
        stamp_text = headers.get("webhook-timestamp", "")
        if not msg_id or len(msg_id) > 256:
            raise AuthError("webhook-id: missing or longer than 256 characters", "signature")
        if not stamp_text.isdigit() or len(stamp_text) > 12:
            raise AuthError("webhook-timestamp: not whole Unix seconds", "signature")
        stamp = int(stamp_text)
        if abs(time.time() - stamp) > _TOLERANCE_S:
            raise AuthError("webhook-timestamp: more than 5 minutes from this host's clock",
                            "stale")
        expected = hmac.new(self._key, signed_string(msg_id, stamp, method, target, body),
                            hashlib.sha256).digest()
        matched = False
        for entry in headers.get("webhook-signature", "").split():
            version, _, encoded = entry.partition(",")
            if version != "v1":
                continue
            try:
                presented = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                continue
            matched |= hmac.compare_digest(expected, presented)
        if not matched:
            raise AuthError("webhook-signature: no v1 signature matches (it covers "
                            "webhook-id, webhook-timestamp, method, path with query, "
                            "and body)",
                            "signature")
        try:
            fresh = await self._replay.claim(msg_id, stamp)
        except OSError as exc:
            # Fail closed: an id that cannot be recorded could be replayed later.
            log.error("cannot record webhook-id: %s", exc)
            raise AuthError("cannot record the webhook-id (see the daemon's log); "
                            "refused", "replay-store", status=503) from exc
        if not fresh:
            raise AuthError(f"replayed webhook-id {msg_id!r}", "replay")

    async def identify(self, method: str, target: str, headers: dict[bytes, bytes],
                       body: bytes | None) -> Identity:
        """Who sent this request; AuthError when no credential holds.

        `headers` are raw bytes, lower-case names: a header that is not valid UTF-8 is
        a failed authentication, not a server error. `body` is None for a request
        that carries no signature (the body is not read for a token alone).
        """
        name: str | None = None
        needs_signature = False
        if b"authorization" in headers:
            name, needs_signature = self._bearer(headers[b"authorization"])
        if b"webhook-signature" in headers:
            try:
                text = {k.decode("ascii"): v.decode("ascii") for k, v in headers.items()
                        if k.startswith(b"webhook-")}
            except UnicodeDecodeError as exc:
                raise AuthError("webhook-* headers must be ASCII", "signature") from exc
            await self._signature(method, target, body or b"", text)
            return Identity(f"api:{name}" if name is not None else "api:webhook")
        if needs_signature:
            raise AuthError(f"token {name!r} needs a signed request (webhook-id, "
                            "webhook-timestamp, webhook-signature)", "unsigned")
        if name is None:
            raise AuthError("authentication required (Authorization: Bearer <token>, or "
                            "a signed request)", "missing")
        if ON_BEHALF_HEADER in headers:
            return Identity(self._on_behalf(name, headers[ON_BEHALF_HEADER]))
        return Identity(f"api:{name}")

    def _on_behalf(self, name: str, header: bytes) -> str:
        """`requested_by` for a token that acts for someone else (a fleet's Discord bot
        calling a node for a user): the user, and the token that vouched for them."""
        value = header.decode("ascii", errors="replace").strip()
        if not _ON_BEHALF.fullmatch(value):
            raise AuthError(f"{ON_BEHALF_HEADER.decode()}: expected KIND:ID such as "
                            "discord:1234", "on_behalf", status=400)
        kind = value.partition(":")[0]
        if kind not in self._act_for.get(name, frozenset()):
            raise AuthError(f"token {name!r} may not act for {kind} users ([api.tokens."
                            f"{name}] act_for)", "on_behalf", status=403)
        return f"{value} via api:{name}"
