"""``graft migrate``, ``serve`` and ``worker``: running Graft as a service, embedded or on a broker."""

from __future__ import annotations

import contextlib
from typing import Annotated

import typer

from api.cli.base import app, err, guard, out
from api.runtime import build_runtime


@app.command()
def migrate() -> None:
    """Bring the configured database to the newest schema."""
    guard(lambda: build_runtime(migrate=True))
    out.print("database schema is up to date")


@app.command()
def serve(
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8000,
    device: Annotated[str | None, typer.Option("--device", help="Embedded mode: cpu or cuda.")] = None,
    log_level: Annotated[str, typer.Option("--log-level", help="uvicorn log level.")] = "info",
) -> None:
    """Run the REST API. Without GRAFT_BROKER_URL it also runs submitted merges, in a thread of this process."""
    import uvicorn

    from api.app import create_app
    from api.dispatch import Dispatcher, EmbeddedDispatcher, dispatcher_for

    runtime = guard(build_runtime)
    runner = None
    dispatcher: Dispatcher
    if runtime.settings.broker_url:
        dispatcher = guard(lambda: dispatcher_for(runtime.settings))
        err.print(f"graft: merges go to the broker (queue {runtime.settings.merge_queue!r}); run `graft worker`")
    else:
        from workers.embedded import EmbeddedRunner

        runner = EmbeddedRunner(
            runtime.sessions,
            runtime.store,
            device=device,
            progress_interval=runtime.settings.progress_interval_seconds,
        )
        runner.start()
        dispatcher = EmbeddedDispatcher(runner.wake)
        err.print("graft: embedded mode (no GRAFT_BROKER_URL): merges run in this process, one at a time")
    try:
        uvicorn.run(create_app(runtime=runtime, dispatcher=dispatcher), host=host, port=port, log_level=log_level)
    finally:
        if runner is not None:
            runner.stop(timeout=10)


@app.command()
def worker(
    queues: Annotated[
        str | None, typer.Option("--queues", "-Q", help="Comma-separated queues; default: merge and publish.")
    ] = None,
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", help="Merges run at once.")] = 1,
    loglevel: Annotated[str, typer.Option("--loglevel", help="Celery log level.")] = "INFO",
    device: Annotated[str | None, typer.Option("--device", help="Embedded mode: cpu or cuda.")] = None,
) -> None:
    """Run merges: a Celery worker on GRAFT_BROKER_URL; with no broker, the embedded runner in the foreground."""
    runtime = guard(build_runtime)
    settings = runtime.settings
    if settings.broker_url:
        from workers.celery_app import make_celery

        celery = guard(lambda: make_celery(settings))
        celery.set_current()
        wanted = queues or f"{settings.merge_queue},{settings.publish_queue}"
        celery.worker_main(
            ["worker", "-Q", wanted, "--concurrency", str(concurrency), "--loglevel", loglevel, "--without-gossip"]
        )
        return
    from workers.embedded import EmbeddedRunner

    runner = EmbeddedRunner(
        runtime.sessions, runtime.store, device=device, progress_interval=settings.progress_interval_seconds
    )
    runner.recover()
    err.print("graft: no GRAFT_BROKER_URL; running queued merges from the database (one runner per database)")
    with contextlib.suppress(KeyboardInterrupt):
        runner.run_forever()
