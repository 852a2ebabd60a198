"""Who may do what through the web: bearer tokens with scopes.

Scopes, each allowing more: `read` (every GET), `control` (link and node changes,
verify), `exec` (run commands inside nodes). A token is given as the header
`Authorization: Bearer TOKEN`, or once as a login link (`/login?once=CODE`)
that sets a session cookie and is then spent.

On a loopback bind a request without a token may read, and nothing more: every
write (control and exec) needs a token, or the session of the login link, whose
scopes allow it, and answers 403 without one. Anyone on the machine can reach a
loopback port (other users' processes, a browser's page from any site posting
to it), so a write there is not the same as the local CLI run by the user who
started the server. On any other address every request needs a token: 401
without one, 403 when its scopes do not allow the request.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass, field

SCOPES = ("read", "control", "exec")
COOKIE = "megafleet_session"


class AuthError(Exception):
    """status 401 (who are you?) or 403 (not allowed)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Auth:
    """The tokens of one server run. `loopback` says whether the bind address
    is loopback-only (then anonymous requests get `anonymous_scopes`)."""

    loopback: bool
    tokens: dict[str, frozenset[str]] = field(default_factory=dict)
    once: dict[str, frozenset[str]] = field(default_factory=dict)
    sessions: dict[str, frozenset[str]] = field(default_factory=dict)

    @property
    def anonymous_scopes(self) -> frozenset[str]:
        return frozenset({"read"}) if self.loopback else frozenset()

    def add_token(self, scopes: set[str] | frozenset[str], token: str | None = None) -> str:
        """A new bearer token with these scopes (ValueError for an unknown scope)."""
        unknown = set(scopes) - set(SCOPES)
        if unknown:
            raise ValueError(f"unknown scope(s) {', '.join(sorted(unknown))}: use {', '.join(SCOPES)}")
        token = token or secrets.token_urlsafe(24)
        self.tokens[token] = frozenset(scopes)
        return token

    def add_login_link(self, scopes: set[str] | frozenset[str]) -> str:
        code = secrets.token_urlsafe(24)
        self.once[code] = frozenset(scopes)
        return code

    def spend_login(self, code: str) -> str:
        """Trade a one-time code for a session id (AuthError 401 when spent or unknown)."""
        scopes = self.once.pop(code, None)
        if scopes is None:
            raise AuthError(401, "this login link was used already or is unknown: start the server again for a new one")
        session = secrets.token_urlsafe(24)
        self.sessions[session] = scopes
        return session

    def scopes_for(self, authorization: str | None, cookie: str | None) -> frozenset[str] | None:
        """The scopes a request has, or None when it presented nothing."""
        if authorization:
            kind, _, token = authorization.partition(" ")
            if kind.lower() != "bearer" or not token:
                raise AuthError(401, "Authorization: expected 'Bearer TOKEN'")
            for known, scopes in self.tokens.items():
                if hmac.compare_digest(known, token.strip()):
                    return scopes
            raise AuthError(401, "unknown token")
        if cookie and cookie in self.sessions:
            return self.sessions[cookie]
        return None

    def check(self, need: str, authorization: str | None, cookie: str | None) -> None:
        """Raise AuthError unless the request may do something needing scope `need`."""
        scopes = self.scopes_for(authorization, cookie)
        if scopes is None:
            if need in self.anonymous_scopes:
                return
            if not self.loopback:
                raise AuthError(401, "a token is required on this address (Authorization: Bearer TOKEN)")
            raise AuthError(403, f"'{need}' needs a token that allows it (Authorization: Bearer TOKEN, "
                                 "or the session of the login link printed at start)")
        if need not in scopes:
            raise AuthError(403, f"this token does not allow '{need}' (it allows: {', '.join(sorted(scopes))})")
