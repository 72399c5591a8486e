"""Many clients at once against a real uvicorn server on PostgreSQL: every request is answered, none with a 500.

Regression: with more requests in flight than database connections, requests holding a connection waited for a
thread while every thread waited for a connection, until the pool timed out (30 s) and the API answered 500.
``bench/api.py`` found it at 55 clients; ``ConcurrencyLimit`` in ``api/app.py`` bounds the requests at work.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from api.app import create_app
from registry.db import make_engine, make_session_factory, session_scope
from registry.migrate import upgrade_to_head
from registry.services.tokens import create_token
from registry.settings import Settings
from tests.conftest import create_pg_database, drop_pg_database

CLIENTS = 120


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, str]]:
    db_url = create_pg_database("graft_load")
    engine = make_engine(db_url)
    upgrade_to_head(engine)
    with session_scope(make_session_factory(engine)) as session:
        token = create_token(session, "load", "read").secret
    engine.dispose()
    settings = Settings(home=tmp_path / "home", database_url=db_url)
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", token
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        app.state.graft.runtime.engine.dispose()
        drop_pg_database(db_url)


def test_more_clients_than_connections_are_all_answered(server: tuple[str, str]) -> None:
    url, token = server

    async def hammer() -> list[int]:
        limits = httpx.Limits(max_connections=CLIENTS)
        headers = {"Authorization": f"Bearer {token}"}  # a token lookup: a DB connection before the route runs
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60, headers=headers) as client:
            answers = await asyncio.gather(*(client.get("/v1/adapters") for _ in range(CLIENTS)))
        return [answer.status_code for answer in answers]

    started = time.monotonic()
    statuses = asyncio.run(hammer())
    assert statuses == [200] * CLIENTS, sorted(set(statuses))
    assert time.monotonic() - started < 25  # the pool's 30 s timeout was never reached
