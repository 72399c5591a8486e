"""Request-scoped dependencies: the unit of work (the one commit point of a request) and authentication.

:func:`unit_of_work` opens a session scope around the route. The route's changes are committed when it
returns (before the response is sent) and rolled back when it raises. Work that must follow the commit, such
as handing a job id to the broker, is registered with :meth:`UnitOfWork.after_commit`, so a worker can never
receive the id of a job that is not yet (or never) committed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.dispatch import Dispatcher
from api.runtime import Runtime
from registry.db import session_scope
from registry.services import tokens
from registry.services.tokens import Principal
from registry.settings import Settings


@dataclass(frozen=True)
class AppState:
    """What the app factory wired: settings, database and store (the runtime), and the job dispatcher."""

    settings: Settings
    runtime: Runtime
    dispatcher: Dispatcher


def app_state(request: Request) -> AppState:
    state: AppState = request.app.state.graft
    return state


State = Annotated[AppState, Depends(app_state)]


@dataclass
class UnitOfWork:
    """A request's session, and what to do once its transaction has committed."""

    session: Session
    _after: list[Callable[[], None]] = field(default_factory=list)

    def after_commit(self, action: Callable[[], None]) -> None:
        """Run ``action`` after a successful commit (never after a rollback)."""
        self._after.append(action)


def unit_of_work(request: Request) -> Iterator[UnitOfWork]:
    """Open the request's transaction; commit when the route returns, then run the after-commit actions."""
    with session_scope(app_state(request).runtime.sessions) as session:
        uow = UnitOfWork(session)
        yield uow
    for action in uow._after:
        action()


# scope="function": the commit happens when the route returns, so errors (a conflict at commit, a broker
# refusing the job) still become the response instead of being lost after it was sent.
UoW = Annotated[UnitOfWork, Depends(unit_of_work, scope="function")]

bearer = HTTPBearer(auto_error=False, description="An API token from `graft token create --scope read|write|admin`.")


def principal(uow: UoW, credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> Principal | None:
    """Who is calling: None without a token; a bad token is refused (401) even where reads are open."""
    if credentials is None:
        return None
    return tokens.authenticate(uow.session, credentials.credentials)


def reader(state: State, who: Principal | None = Depends(principal)) -> Principal | None:
    """Reads: open when ``GRAFT_PUBLIC_READS`` is true (the default), else a ``read`` token or better."""
    tokens.authorize(who, "read", anonymous_allowed=state.settings.public_reads)
    return who


def writer(who: Principal | None = Depends(principal)) -> Principal:
    """Writes always need a ``write`` (or ``admin``) token."""
    tokens.authorize(who, "write")
    assert who is not None
    return who


Reader = Annotated[Principal | None, Depends(reader)]
Writer = Annotated[Principal, Depends(writer)]
