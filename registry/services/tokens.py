"""API tokens: created once (shown in clear only then), stored as sha256, checked on each request.

Scopes are ordered: ``read`` < ``write`` < ``admin``; a token's scope includes every scope below it.
Tokens never appear in messages, logs or the database: only their hash and a short display prefix do.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy.orm import Session

from registry import repositories as repo
from registry.errors import Forbidden, InvalidInput, Unauthenticated
from registry.models import ApiToken

SCOPES = ("read", "write", "admin")
TOKEN_PREFIX = "graft_"


@dataclass(frozen=True)
class Principal:
    """Who made a request: the token's id, name and scope (never the token)."""

    token_id: int
    name: str
    scope: str

    def allows(self, needed: str) -> bool:
        return SCOPES.index(self.scope) >= SCOPES.index(needed)


@dataclass(frozen=True)
class IssuedToken:
    """A freshly created token. ``secret`` is the only copy of the token in clear."""

    id: int
    name: str
    scope: str
    prefix: str
    secret: str


def hash_token(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def check_scope(scope: str) -> str:
    if scope not in SCOPES:
        raise InvalidInput(f"unknown scope {scope!r}; use one of {', '.join(SCOPES)}")
    return scope


def create_token(session: Session, name: str, scope: str) -> IssuedToken:
    """Make a token with ``scope``; store its hash. The caller shows ``secret`` once and forgets it."""
    check_scope(scope)
    name = name.strip()
    if not name or len(name) > 100:
        raise InvalidInput("a token needs a name of 1 to 100 characters, e.g. --name ci")
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken(name=name, token_hash=hash_token(secret), prefix=secret[: len(TOKEN_PREFIX) + 4], scope=scope)
    session.add(token)
    session.flush()
    return IssuedToken(token.id, token.name, token.scope, token.prefix, secret)


def authenticate(session: Session, secret: str) -> Principal:
    """The principal a bearer token stands for; :class:`Unauthenticated` if it is unknown or revoked."""
    token = repo.get_token_by_hash(session, hash_token(secret.strip()))
    if token is None or token.revoked_at is not None:
        raise Unauthenticated("the API token is unknown or revoked; create one with `graft token create`")
    return Principal(token.id, token.name, token.scope)


def authorize(principal: Principal | None, needed: str, *, anonymous_allowed: bool = False) -> None:
    """Refuse a request that needs ``needed`` from ``principal`` (None: no token was sent)."""
    if principal is None:
        if anonymous_allowed:
            return
        raise Unauthenticated(
            f"this request needs an API token with the {needed!r} scope: send Authorization: Bearer …"
        )
    if not principal.allows(needed):
        raise Forbidden(
            f"the API token {principal.name!r} has scope {principal.scope!r}; this request needs {needed!r}"
        )


def revoke_token(session: Session, token_id: int) -> None:
    token = repo.get_token(session, token_id)
    if token is None:
        raise InvalidInput(f"no API token with id {token_id}")
    if token.revoked_at is None:
        token.revoked_at = dt.datetime.now(dt.UTC)
        session.flush()
