"""HTTP Digest authentication for SIP (RFC 3261 §22, RFC 2617, RFC 7616, RFC 8760).

Client side: ``DigestChallenge.parse`` reads WWW-Authenticate / Proxy-Authenticate and
``DigestClient.authorize`` answers it (qop=auth or auth-int with cnonce and a per-nonce nc, or the
legacy no-qop form). Server side: ``DigestServer`` issues stateless nonces (a timestamp and salt
signed with HMAC-SHA-256, so nothing is stored) and verifies Authorization against a password
table. Algorithms: MD5, MD5-sess, SHA-256, SHA-256-sess. ``now`` is always passed in.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from worker.errors import RemoteError
from worker.sip.message import SipParseError, quote, split_outside_quotes, unquote

SUPPORTED_ALGORITHMS: Final = ("SHA-256", "SHA-256-sess", "MD5", "MD5-sess")
_HASHES: Final[dict[str, Callable[[bytes], str]]] = {
    "MD5": lambda data: hashlib.md5(data, usedforsecurity=False).hexdigest(),
    "SHA-256": lambda data: hashlib.sha256(data).hexdigest(),
}
_MAX_NONCES_TRACKED: Final = 64


class AuthError(RemoteError):
    """A challenge or credentials header that cannot be parsed or used."""


class UnsupportedChallengeError(AuthError):
    """The peer asks for a scheme, algorithm or qop we do not implement."""


def challenge_header_names(status: int) -> tuple[str, str]:
    """(challenge header, credentials header) for a 401 or a 407."""
    if status == 407:
        return "Proxy-Authenticate", "Proxy-Authorization"
    return "WWW-Authenticate", "Authorization"


def _canonical_algorithm(name: str) -> str:
    for known in SUPPORTED_ALGORITHMS:
        if known.lower() == name.lower():
            return known
    raise UnsupportedChallengeError(f"unsupported digest algorithm {name!r}")


def _hasher(algorithm: str) -> Callable[[bytes], str]:
    return _HASHES[algorithm.removesuffix("-sess")]


def _parse_digest_params(value: str) -> dict[str, str]:
    """``Digest name=value, name="quoted", ...`` -> {lower-case name: unquoted value}."""
    value = value.strip()
    scheme, _, rest = value.partition(" ")
    if not scheme:
        raise AuthError("empty authentication header")
    if scheme.lower() != "digest":
        raise UnsupportedChallengeError(f"unsupported authentication scheme {scheme[:20]!r}")
    params: dict[str, str] = {}
    try:
        pieces = split_outside_quotes(rest, ",")
    except SipParseError as exc:
        raise AuthError(exc.reason) from None
    for piece in pieces:
        piece = piece.strip()
        if not piece:
            continue
        name, eq, raw = piece.partition("=")
        if not eq:
            raise AuthError(f"malformed auth-param {name.strip()[:20]!r}")
        params[name.strip().lower()] = unquote(raw)
    return params


def compute_response(
    *,
    algorithm: str,
    username: str,
    password: str,
    realm: str,
    nonce: str,
    method: str,
    uri: str,
    qop: str | None = None,
    nc: str | None = None,
    cnonce: str | None = None,
    body: bytes = b"",
) -> str:
    """The ``response`` value of RFC 7616 §3.4.1 (and RFC 2617 §3.2.2 without qop)."""
    algorithm = _canonical_algorithm(algorithm)
    h = _hasher(algorithm)
    ha1 = h(f"{username}:{realm}:{password}".encode())
    if algorithm.endswith("-sess"):
        ha1 = h(f"{ha1}:{nonce}:{cnonce or ''}".encode())
    if qop == "auth-int":
        ha2 = h(f"{method}:{uri}:".encode() + h(body).encode())
    else:
        ha2 = h(f"{method}:{uri}".encode())
    if qop:
        return h(f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}".encode())
    return h(f"{ha1}:{nonce}:{ha2}".encode())


@dataclass(frozen=True, slots=True)
class DigestChallenge:
    """One Digest challenge from WWW-Authenticate or Proxy-Authenticate."""

    realm: str
    nonce: str
    algorithm: str = "MD5"
    qop: tuple[str, ...] = ()
    opaque: str | None = None
    stale: bool = False
    domain: str | None = None

    @classmethod
    def parse(cls, value: str) -> DigestChallenge:
        params = _parse_digest_params(value)
        if "realm" not in params or "nonce" not in params:
            raise AuthError("digest challenge without realm or nonce")
        qop = tuple(q.strip().lower() for q in params.get("qop", "").split(",") if q.strip())
        return cls(
            realm=params["realm"],
            nonce=params["nonce"],
            algorithm=_canonical_algorithm(params.get("algorithm", "MD5")),
            qop=qop,
            opaque=params.get("opaque"),
            stale=params.get("stale", "").lower() == "true",
            domain=params.get("domain"),
        )

    def __str__(self) -> str:
        parts = [f"realm={quote(self.realm)}", f"nonce={quote(self.nonce)}"]
        if self.opaque is not None:
            parts.append(f"opaque={quote(self.opaque)}")
        parts.append(f"algorithm={self.algorithm}")
        if self.qop:
            parts.append(f'qop="{",".join(self.qop)}"')
        if self.stale:
            parts.append("stale=true")
        return "Digest " + ", ".join(parts)


def choose_challenge(values: Iterable[str]) -> DigestChallenge:
    """The strongest Digest challenge we support among several headers (RFC 8760 §2.4)."""
    best: DigestChallenge | None = None
    for value in values:
        try:
            challenge = DigestChallenge.parse(value)
        except UnsupportedChallengeError:
            continue
        rank = SUPPORTED_ALGORITHMS.index(challenge.algorithm)
        if best is None or rank < SUPPORTED_ALGORITHMS.index(best.algorithm):
            best = challenge
    if best is None:
        raise UnsupportedChallengeError("no supported digest challenge")
    return best


@dataclass(frozen=True, slots=True)
class DigestCredentials:
    """The content of an Authorization or Proxy-Authorization header."""

    username: str
    realm: str
    nonce: str
    uri: str
    response: str
    algorithm: str = "MD5"
    qop: str | None = None
    nc: str | None = None
    cnonce: str | None = None
    opaque: str | None = None

    @classmethod
    def parse(cls, value: str) -> DigestCredentials:
        params = _parse_digest_params(value)
        try:
            return cls(
                username=params["username"],
                realm=params["realm"],
                nonce=params["nonce"],
                uri=params["uri"],
                response=params["response"].lower(),
                algorithm=_canonical_algorithm(params.get("algorithm", "MD5")),
                qop=params.get("qop"),
                nc=params.get("nc"),
                cnonce=params.get("cnonce"),
                opaque=params.get("opaque"),
            )
        except KeyError as exc:
            raise AuthError(f"digest credentials without {exc.args[0]}") from None

    def __str__(self) -> str:
        parts = [
            f"username={quote(self.username)}",
            f"realm={quote(self.realm)}",
            f"nonce={quote(self.nonce)}",
            f"uri={quote(self.uri)}",
            f"response={quote(self.response)}",
            f"algorithm={self.algorithm}",
        ]
        if self.qop is not None:
            parts += [f"qop={self.qop}", f"nc={self.nc}", f"cnonce={quote(self.cnonce or '')}"]
        if self.opaque is not None:
            parts.append(f"opaque={quote(self.opaque)}")
        return "Digest " + ", ".join(parts)


class DigestClient:
    """Answers challenges for one user, counting ``nc`` per server nonce (RFC 7616 §3.4)."""

    def __init__(self, username: str, password: str) -> None:
        self.username = username
        self._password = password
        self._nonce_counts: dict[str, int] = {}

    def authorize(
        self,
        challenge: DigestChallenge,
        method: str,
        uri: str,
        *,
        body: bytes = b"",
        cnonce: str | None = None,
    ) -> str:
        """The Authorization / Proxy-Authorization value for a request to ``uri``."""
        qop: str | None = None
        if "auth" in challenge.qop:
            qop = "auth"
        elif "auth-int" in challenge.qop:
            qop = "auth-int"
        elif challenge.qop:
            raise UnsupportedChallengeError(f"unsupported qop {','.join(challenge.qop)[:40]!r}")
        nc: str | None = None
        if qop is not None or challenge.algorithm.endswith("-sess"):
            cnonce = cnonce or secrets.token_hex(8)
        if qop is not None:
            counts = self._nonce_counts
            if challenge.nonce not in counts and len(counts) >= _MAX_NONCES_TRACKED:
                counts.clear()
            counts[challenge.nonce] = count = counts.get(challenge.nonce, 0) + 1
            nc = f"{count:08x}"
        response = compute_response(
            algorithm=challenge.algorithm,
            username=self.username,
            password=self._password,
            realm=challenge.realm,
            nonce=challenge.nonce,
            method=method,
            uri=uri,
            qop=qop,
            nc=nc,
            cnonce=cnonce,
            body=body,
        )
        credentials = DigestCredentials(
            username=self.username,
            realm=challenge.realm,
            nonce=challenge.nonce,
            uri=uri,
            response=response,
            algorithm=challenge.algorithm,
            qop=qop,
            nc=nc,
            cnonce=cnonce if qop is not None else None,
            opaque=challenge.opaque,
        )
        return str(credentials)


class AuthOutcome(StrEnum):
    OK = "ok"
    STALE = "stale"  # right password, expired nonce: challenge again with stale=true
    REJECTED = "rejected"  # wrong password, unknown user, foreign nonce: 401/403
    MALFORMED = "malformed"  # unparseable credentials: 400 or a fresh challenge


@dataclass(frozen=True, slots=True)
class AuthResult:
    outcome: AuthOutcome
    username: str | None
    reason: str

    @property
    def ok(self) -> bool:
        return self.outcome is AuthOutcome.OK


class DigestServer:
    """Challenges and verifies Digest credentials for one realm (RFC 7616, RFC 3261 §22).

    A nonce is ``base64url(timestamp | salt | HMAC-SHA-256(secret, timestamp | salt | realm |
    method | Request-URI))``: it verifies, without storage, only for the method and Request-URI of
    the request it challenged and only for ``nonce_lifetime`` seconds (then ``STALE``: challenge
    again with ``stale=true``). With ``qop`` (the default, ``auth``) credentials must carry it,
    and each nonce's ``nc`` must grow: a repeated or lower count is a replay and is refused. The
    counts are kept for at most ``max_nonces`` nonces; a nonce no longer remembered is only taken
    with ``nc=1``, else it is answered as stale, so forgetting never opens a replay.
    """

    def __init__(
        self,
        realm: str,
        secret: bytes,
        credentials: Mapping[str, str],
        *,
        algorithms: Iterable[str] = ("MD5",),
        qop: str | None = "auth",
        nonce_lifetime: float = 300.0,
        max_nonces: int = 10_000,
    ) -> None:
        self.realm = realm
        self._secret = secret
        self._credentials = credentials
        self.algorithms = tuple(_canonical_algorithm(a) for a in algorithms)
        self.qop = qop
        self.nonce_lifetime = nonce_lifetime
        self.max_nonces = max_nonces
        self._counts: OrderedDict[str, int] = OrderedDict()
        self.replays = 0

    def _mac(self, stamp: bytes, method: str, uri: str) -> bytes:
        message = b"|".join((stamp, self.realm.encode(), method.encode(), uri.encode()))
        return hmac.new(self._secret, message, hashlib.sha256).digest()[:16]

    def make_nonce(self, now: float, method: str = "", uri: str = "") -> str:
        """A nonce for a request of ``method`` to ``uri``."""
        stamp = struct.pack(">d", now) + secrets.token_bytes(8)
        return base64.urlsafe_b64encode(stamp + self._mac(stamp, method, uri)).decode().rstrip("=")

    def nonce_issued_at(self, nonce: str, method: str = "", uri: str = "") -> float | None:
        """When we issued ``nonce`` for ``method`` and ``uri``; None if we did not."""
        try:
            raw = base64.urlsafe_b64decode(nonce + "=" * (-len(nonce) % 4))
        except (binascii.Error, ValueError):
            return None
        if len(raw) != 32:
            return None
        stamp, mac = raw[:16], raw[16:]
        if not hmac.compare_digest(mac, self._mac(stamp, method, uri)):
            return None
        issued: float = struct.unpack(">d", stamp[:8])[0]
        return issued

    def challenges(
        self, now: float, *, stale: bool = False, method: str = "", uri: str = ""
    ) -> list[str]:
        """One WWW-Authenticate / Proxy-Authenticate value per algorithm, strongest first, for
        a request of ``method`` to ``uri``."""
        nonce = self.make_nonce(now, method, uri)
        ordered = sorted(self.algorithms, key=SUPPORTED_ALGORITHMS.index)
        qop = (self.qop,) if self.qop else ()
        return [
            str(DigestChallenge(self.realm, nonce, algorithm, qop, stale=stale))
            for algorithm in ordered
        ]

    def challenge(self, now: float, *, stale: bool = False, method: str = "", uri: str = "") -> str:
        """The single challenge for the strongest configured algorithm."""
        return self.challenges(now, stale=stale, method=method, uri=uri)[0]

    def verify(
        self,
        authorization: str,
        method: str,
        now: float,
        *,
        body: bytes = b"",
        request_uri: str | None = None,
    ) -> AuthResult:
        """Check one Authorization / Proxy-Authorization value for a request."""
        try:
            creds = DigestCredentials.parse(authorization)
        except AuthError as exc:
            return AuthResult(AuthOutcome.MALFORMED, None, str(exc))
        user = creds.username
        if creds.realm != self.realm:
            return AuthResult(AuthOutcome.REJECTED, user, "wrong realm")
        if creds.algorithm not in self.algorithms:
            return AuthResult(AuthOutcome.REJECTED, user, "algorithm not offered")
        if request_uri is not None and creds.uri != request_uri:
            return AuthResult(AuthOutcome.REJECTED, user, "digest uri differs from Request-URI")
        if creds.qop is not None and (creds.qop not in ("auth", "auth-int") or not creds.nc):
            return AuthResult(AuthOutcome.MALFORMED, user, "bad qop or nc")
        if self.qop is not None and creds.qop is None:
            return AuthResult(AuthOutcome.REJECTED, user, "qop required")
        issued = self.nonce_issued_at(creds.nonce, method, creds.uri)
        if issued is None or issued > now + 1.0:
            return AuthResult(AuthOutcome.REJECTED, user, "nonce not issued here")
        password = self._credentials.get(user)
        if password is None:
            return AuthResult(AuthOutcome.REJECTED, user, "unknown user")
        expected = compute_response(
            algorithm=creds.algorithm,
            username=user,
            password=password,
            realm=self.realm,
            nonce=creds.nonce,
            method=method,
            uri=creds.uri,
            qop=creds.qop,
            nc=creds.nc,
            cnonce=creds.cnonce,
            body=body,
        )
        if not hmac.compare_digest(expected, creds.response):
            return AuthResult(AuthOutcome.REJECTED, user, "wrong response")
        if now - issued > self.nonce_lifetime:
            return AuthResult(AuthOutcome.STALE, user, "nonce expired")
        if creds.nc is not None:
            return self._count(creds.nonce, creds.nc, user)
        return AuthResult(AuthOutcome.OK, user, "ok")

    def _count(self, nonce: str, nc: str, user: str) -> AuthResult:
        try:
            count = int(nc, 16)
        except ValueError:
            return AuthResult(AuthOutcome.MALFORMED, user, "bad nc")
        last = self._counts.get(nonce)
        if last is None and count != 1:
            return AuthResult(AuthOutcome.STALE, user, "nonce count not known: start again")
        if last is not None and count <= last:
            self.replays += 1
            return AuthResult(AuthOutcome.REJECTED, user, "replayed nonce count")
        self._counts[nonce] = count
        self._counts.move_to_end(nonce)
        while len(self._counts) > self.max_nonces:
            self._counts.popitem(last=False)
        return AuthResult(AuthOutcome.OK, user, "ok")
