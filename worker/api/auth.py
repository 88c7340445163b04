"""Who is calling the API: a JWT, from ``Authorization: Bearer`` or ``?token=`` (the hub and the
audio URL, which browsers cannot give a header), checked with the HS256 shared secret or the
RS256 public key of ``[api]``.

Claims (documented in the README): ``uid`` (required; the user, string or number), ``exp``
(required), ``workspaces`` (the workspace ids the user is a member of) or ``role: "operator"``
(every workspace); ``aud``/``iss`` when ``api.jwt_audience``/``api.jwt_issuer`` are set.
A token that fails any check is 401; a valid token for a workspace the user is not in is 403.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from starlette.requests import HTTPConnection as Request

from worker.config import ApiSettings

ALGORITHM_SECRET = "HS256"
ALGORITHM_KEY = "RS256"


class AuthError(Exception):
    """The token is missing, malformed, expired or signed with another key (401)."""


class ForbiddenError(Exception):
    """A valid token whose user may not see this workspace (403)."""


@dataclass(frozen=True, slots=True)
class Principal:
    uid: str
    workspaces: frozenset[int]
    operator: bool = False

    def may_see(self, workspace_id: int) -> bool:
        return self.operator or workspace_id in self.workspaces

    def check(self, workspace_id: int) -> None:
        if not self.may_see(workspace_id):
            raise ForbiddenError(f"not a member of workspace {workspace_id}")


class TokenVerifier:
    def __init__(self, api: ApiSettings, data_dir: Path) -> None:
        self._audience = api.jwt_audience
        self._issuer = api.jwt_issuer
        if api.jwt_public_key:
            pem = api.jwt_public_key
            if not pem.lstrip().startswith("-----BEGIN"):
                pem = Path(pem).read_text(encoding="utf-8")
            self._key: Any = pem
            self._algorithm = ALGORITHM_KEY
        else:
            self._key = api.jwt_secret or local_secret(data_dir)
            self._algorithm = ALGORITHM_SECRET

    @property
    def algorithm(self) -> str:
        return self._algorithm

    def verify(self, token: str | None) -> Principal:
        if not token:
            raise AuthError("a token is required (Authorization: Bearer, or ?token=)")
        options = {"require": ["exp", "uid"]}
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=[self._algorithm],
                audience=self._audience,
                issuer=self._issuer,
                options=options,  # type: ignore[arg-type]
            )
        except jwt.ExpiredSignatureError as exc:
            raise AuthError("the token has expired") from exc
        except jwt.PyJWTError as exc:
            raise AuthError(f"invalid token: {exc}") from exc
        uid = claims.get("uid")
        if not isinstance(uid, str | int) or isinstance(uid, bool) or str(uid) == "":
            raise AuthError("invalid token: uid must be a string or a number")
        workspaces = claims.get("workspaces", [])
        if not isinstance(workspaces, list) or not all(
            isinstance(w, int) and not isinstance(w, bool) for w in workspaces
        ):
            raise AuthError("invalid token: workspaces must be a list of integers")
        return Principal(str(uid), frozenset(workspaces), claims.get("role") == "operator")

    def issue(
        self,
        uid: str,
        workspaces: list[int],
        *,
        operator: bool = False,
        lifetime_s: float = 3600.0,
    ) -> str:
        """A token signed with the shared secret (not possible with only a public key)."""
        if self._algorithm != ALGORITHM_SECRET:
            raise AuthError("tokens are issued by whoever holds the RS256 private key")
        claims: dict[str, Any] = {
            "uid": uid,
            "workspaces": workspaces,
            "exp": int(time.time() + lifetime_s),
        }
        if operator:
            claims["role"] = "operator"
        if self._audience:
            claims["aud"] = self._audience
        if self._issuer:
            claims["iss"] = self._issuer
        return jwt.encode(claims, self._key, algorithm=self._algorithm)


def local_secret(data_dir: Path) -> str:
    """The worker's own HS256 secret (``data_dir/api-secret``, made once, mode 0600)."""
    path = data_dir / "api-secret"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(48), encoding="utf-8")
    return path.read_text(encoding="utf-8").strip()


def bearer_or_query_token(request: Request, token: str | None = None) -> str | None:
    """The JWT of ``Authorization: Bearer``, else the ``?token=`` one (None: neither)."""
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return token
