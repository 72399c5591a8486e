"""API benchmark (issue 5): lineage queries on a 10 000-version registry, and merge submissions under load.

Everything runs against the real services: a scratch PostgreSQL database (created, migrated with Alembic,
dropped at the end), the real app (``api.app:create_app``) under uvicorn in a subprocess (``bench.serve``, which
keeps TCP_NODELAY with several workers; ``--plain-uvicorn`` runs ``uvicorn --workers N`` as is), and Redis as
the Celery broker (a spare Redis db, flushed at the end; no worker runs, so submissions stay queued there).

1. **Lineage.** The database is seeded with bulk inserts: one base model, one adapter per chain, and
   ``--versions`` versions arranged as chains ``--depth`` deep (each version's lineage edge points to its
   predecessor; every ``--fanin-every``-th version also has a second parent, in a partner chain, as a
   two-operand merge would). Each version carries a full module table (``--layout``: the Llama-2-7B one by
   default, 224 modules, as a 7B registry stores), a sha256, an artifact key and, for merges, its expression
   and a succeeded merge job. Then ``GET /v1/adapters/{name}/versions/{v}/lineage`` is timed for
   ``direction=up`` from a chain's leaf, ``down`` from its root and ``both`` from its middle version, (a)
   in-process, through the same service calls the route makes (``resolve_version`` + ``lineage_graph`` on a
   fresh session), and (b) over HTTP, one client, keep-alive. Target: < 20 ms.
2. **Submissions.** Three small synthetic adapters are uploaded (``POST /v1/adapters``), then ``POST
   /v1/merges`` is timed, each submission with a distinct expression and target name (so every one compiles,
   records a queued job and is sent to Redis): 200 from one client (the floor), ``--requests`` from
   ``--clients`` concurrent clients in closed loop (each sends its next request as soon as it has an answer:
   the saturation case), then ``--requests``/2 in open loop at ``--rate`` (Poisson arrivals, at most
   ``--clients`` in flight; latency counts from the scheduled arrival, so a slow server is not hidden). The
   plan-reuse path (a plan that already ran into the same adapter, answered without running) is timed in
   closed loop too. Target: p99 < 100 ms. Server and client CPU per request are read from /proc, and a
   sequential in-process run splits one submission into its phases (auth, compile + record, commit, enqueue).

The load generator shares the machine with the server: on a 2-core box its CPU is part of the budget (the
table reports it). Results and their caveats: ``docs/benchmarks.md``, "API (issue 5)".

Usage::

    python -m bench.api                                   # defaults: 10 000 versions, depth 50, 50 clients
    python -m bench.api --requests 2000 --workers 1       # other settings
    python -m bench.api --rate 10                         # the open-loop part at 10 submissions/s (0: none)
    python -m bench.api --only lineage --explain          # lineage only, with EXPLAIN ANALYZE of the walk
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import math
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg
import redis
from sqlalchemy import Engine, event, insert, text
from sqlalchemy.orm import Session, sessionmaker

from bench.synthetic import LLAMA2_7B, TINY, LlamaShape, write_demo_adapters
from registry.artifacts import ArtifactStore
from registry.db import make_engine, make_session_factory, session_scope
from registry.migrate import upgrade_to_head
from registry.models import Adapter, AdapterVersion, BaseModel, LineageEdge, MergeJob
from registry.services.adapters import resolve_version
from registry.services.lineage import lineage_graph
from registry.services.tokens import create_token

LINEAGE_TARGET_MS = 20.0
SUBMIT_P99_TARGET_MS = 100.0
LAYOUTS = {"7b": LLAMA2_7B, "tiny": TINY}
RANK = 16


# -- the scratch database ---------------------------------------------------------------------------------


@contextmanager
def scratch_database(admin_dsn: str, server_url: str) -> Iterator[str]:
    """An empty database on the server, dropped (connections and all) on the way out. Yields its URL."""
    name = f"graft_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{server_url}/{name}"
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass(frozen=True)
class Seeded:
    chains: int
    depth: int
    versions: int
    edges: int
    jobs: int
    seconds: float


def chain_name(chain: int) -> str:
    return f"chain-{chain:04d}"


def _sha(*parts: object) -> str:
    return hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()


def seed_registry(engine: Engine, *, versions: int, depth: int, fanin_every: int, layout: LlamaShape) -> Seeded:
    """Bulk-insert the lineage graph (Core ``insert`` executemany on the real tables); ids are assigned here.

    Chain ``c`` is adapter ``chain-cccc`` with versions 1..depth; version ``d`` (d ≥ 2) was merged from version
    ``d-1`` (coefficient 0.7), and when ``d`` is a multiple of ``fanin_every`` also from version ``d-1`` of the
    partner chain ``c ^ 1`` (coefficient -0.3), so an ``up`` walk from a leaf covers two chains.
    """
    started = time.perf_counter()
    chains = versions // depth
    modules = {name: [out_f, in_f, RANK, 2.0] for name, (out_f, in_f) in layout.modules().items()}
    targets = sorted({name.rsplit(".", 1)[-1] for name in modules})
    size = sum((out_f + in_f) * RANK * 2 for out_f, in_f in layout.modules().values())
    config = {
        "peft_type": "LORA",
        "base_model_name_or_path": layout.base_model,
        "task_type": "CAUSAL_LM",
        "r": RANK,
        "lora_alpha": 2.0 * RANK,
        "target_modules": targets,
        "lora_dropout": 0.0,
        "bias": "none",
    }

    def vid(chain: int, number: int) -> int:
        return chain * depth + number

    adapters = [
        {"id": c + 1, "name": chain_name(c), "description": f"bench chain {c}", "tags": ["bench", f"family-{c // 2}"]}
        for c in range(chains)
    ]
    version_rows: list[dict[str, Any]] = []
    edge_rows: list[dict[str, Any]] = []
    job_rows: list[dict[str, Any]] = []
    for c in range(chains):
        partner = c ^ 1 if (c ^ 1) < chains else None
        for d in range(1, depth + 1):
            parents = [] if d == 1 else [(vid(c, d - 1), f"{chain_name(c)}@{d - 1}", 0.7)]
            if d > 1 and partner is not None and d % fanin_every == 0:
                parents.append((vid(partner, d - 1), f"{chain_name(partner)}@{d - 1}", -0.3))
            strategy = "ties" if d % 10 == 0 else "linear"
            expression = None
            if parents:
                terms = " + ".join(f"{w:g}*{ref}" for _, ref, w in parents).replace("+ -", "- ")
                expression = (
                    f"ties({', '.join(ref for _, ref, _ in parents)}, density=0.5)" if strategy == "ties" else terms
                )
            sha = _sha("weights", c, d)
            plan_hash = _sha("plan", expression) if expression else None
            version_rows.append(
                {
                    "id": vid(c, d),
                    "adapter_id": c + 1,
                    "number": d,
                    "base_model_id": 1,
                    "base_revision": None,
                    "rank": RANK,
                    "alpha": 2.0 * RANK,
                    "use_rslora": False,
                    "target_modules": targets,
                    "modules": modules,
                    "peft_config": config,
                    "format": "peft",
                    "dtype": "F16",
                    "size_bytes": size,
                    "sha256": sha,
                    "artifact_key": ArtifactStore.key_for(sha),
                    "source": "merge" if parents else "upload",
                    "expression": expression,
                    "plan_hash": plan_hash,
                }
            )
            for parent_id, _, weight in parents:
                edge_rows.append(
                    {
                        "child_id": vid(c, d),
                        "parent_id": parent_id,
                        "coefficient": weight,
                        "role": "operand",
                        "strategy": strategy,
                    }
                )
            if expression is not None and plan_hash is not None:
                job_rows.append(
                    {
                        "id": str(uuid.UUID(int=random.Random(vid(c, d)).getrandbits(128))),
                        "expression": expression,
                        "target_name": chain_name(c),
                        "tags": [],
                        "plan": {"steps": [], "warnings": []},
                        "plan_hash": plan_hash,
                        "status": "succeeded",
                        "progress_done": len(modules),
                        "progress_total": len(modules),
                        "attempts": 1,
                        "engine_seconds": 1.0,
                        "retained_energy": 1.0,
                        "run_warnings": [],
                        "result_version_id": vid(c, d),
                    }
                )
    with engine.begin() as conn:
        conn.execute(insert(BaseModel), [{"id": 1, "name": layout.base_model}])
        conn.execute(insert(Adapter), adapters)
        for start in range(0, len(version_rows), 1000):
            conn.execute(insert(AdapterVersion), version_rows[start : start + 1000])
        conn.execute(insert(LineageEdge), edge_rows)
        conn.execute(insert(MergeJob), job_rows)
        for table in ("base_models", "adapters", "adapter_versions", "lineage_edges"):
            conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))"))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("ANALYZE"))  # what autovacuum does shortly after a bulk load
    return Seeded(chains, depth, len(version_rows), len(edge_rows), len(job_rows), time.perf_counter() - started)


# -- statistics and statement timing ------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0..100), nearest rank on the sorted values."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


@dataclass
class StatementLog:
    """Every statement an engine runs while attached, with its wall time (driver round trip included)."""

    records: list[tuple[str, Any, float]] = field(default_factory=list)
    _started: list[float] = field(default_factory=list)

    @contextmanager
    def attached(self, engine: Engine) -> Iterator[StatementLog]:
        def before(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
            self._started.append(time.perf_counter())

        def after(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
            self.records.append((statement, params, time.perf_counter() - self._started.pop()))

        event.listen(engine, "before_cursor_execute", before)
        event.listen(engine, "after_cursor_execute", after)
        try:
            yield self
        finally:
            event.remove(engine, "before_cursor_execute", before)
            event.remove(engine, "after_cursor_execute", after)

    def clear(self) -> None:
        self.records.clear()

    @property
    def seconds(self) -> float:
        return sum(r[2] for r in self.records)


# -- lineage ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LineageCase:
    direction: str
    number: Callable[[int], int]  # depth -> the version asked about
    label: str


LINEAGE_CASES = (
    LineageCase("up", lambda depth: depth, "up from the leaf"),
    LineageCase("down", lambda depth: 1, "down from the root"),
    LineageCase("both", lambda depth: max(1, depth // 2), "both from the middle"),
)


@dataclass(frozen=True)
class Timing:
    label: str
    samples: list[float]
    nodes: int = 0
    edges: int = 0

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples) * 1000

    @property
    def p99_ms(self) -> float:
        return percentile(self.samples, 99) * 1000


def lineage_in_process(sessions: sessionmaker[Session], seeded: Seeded, case: LineageCase, queries: int) -> Timing:
    """What the route does, minus HTTP: a fresh session, resolve the version, walk the graph, close."""
    samples, nodes, edges = [], 0, 0
    for i in range(queries + 20):
        ref = f"{chain_name(i % seeded.chains)}@{case.number(seeded.depth)}"
        started = time.perf_counter()
        with session_scope(sessions) as session:
            graph = lineage_graph(session, resolve_version(session, ref), case.direction, 64)
        if i >= 20:  # the first few warm the connection pool and the compiled-statement cache
            samples.append(time.perf_counter() - started)
        nodes, edges = max(nodes, len(graph["nodes"])), max(edges, len(graph["edges"]))
    return Timing(case.label, samples, nodes, edges)


def lineage_over_http(base_url: str, seeded: Seeded, case: LineageCase, queries: int) -> Timing:
    samples, nodes, edges = [], 0, 0
    with httpx.Client(base_url=base_url, timeout=30) as client:
        for i in range(queries + 20):
            path = f"/v1/adapters/{chain_name(i % seeded.chains)}/versions/{case.number(seeded.depth)}/lineage"
            started = time.perf_counter()
            response = client.get(path, params={"direction": case.direction})
            elapsed = time.perf_counter() - started
            response.raise_for_status()
            if i >= 20:
                samples.append(elapsed)
            body = response.json()
            nodes, edges = max(nodes, len(body["nodes"])), max(edges, len(body["edges"]))
    return Timing(case.label, samples, nodes, edges)


def lineage_breakdown(engine: Engine, sessions: sessionmaker[Session], seeded: Seeded, explain: bool) -> None:
    """One ``up`` query from a leaf, statement by statement; with ``explain``, EXPLAIN ANALYZE of the walk."""
    ref = f"{chain_name(0)}@{seeded.depth}"
    log = StatementLog()
    with log.attached(engine):
        for _ in range(5):  # keep the last
            log.clear()
            started = time.perf_counter()
            with session_scope(sessions) as session:
                lineage_graph(session, resolve_version(session, ref), "up", 64)
            total = time.perf_counter() - started
    print(f"\n  one 'up' query from {ref}, statement by statement (wall, driver round trip included):")
    for statement, _params, seconds in log.records:
        first = " ".join(statement.split())[:90]
        print(f"    {seconds * 1000:7.2f} ms  {first}")
    print(f"    {log.seconds * 1000:7.2f} ms  in the database driver; {(total - log.seconds) * 1000:.2f} ms in Python")
    if not explain:
        return
    walk = next((r for r in log.records if "RECURSIVE" in r[0].upper()), None)
    if walk is None:
        return
    with engine.connect() as conn:
        raw = conn.connection.driver_connection
        assert raw is not None
        with raw.cursor() as cursor:
            cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + walk[0], walk[1])
            plan = [row[0] for row in cursor.fetchall()]
    print("\n  EXPLAIN ANALYZE of the recursive walk (up, from the leaf):")
    for line in plan:
        print(f"    {line}")


# -- the server ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def api_server(env: dict[str, str], workers: int, plain: bool = False) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """The API on a free port under ``bench.serve`` (uvicorn, TCP_NODELAY kept with several workers) or, with
    ``plain``, ``uvicorn api.app:create_app --factory --workers N`` as is. Yields its URL once /readyz says 200."""
    port = free_port()
    if plain:
        command = [
            sys.executable, "-m", "uvicorn", "api.app:create_app", "--factory",
            "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
            "--log-level", "warning", "--no-access-log",
        ]  # fmt: skip
    else:
        command = [sys.executable, "-m", "bench.serve", "--port", str(port), "--workers", str(workers)]
    process = subprocess.Popen(command, env={**os.environ, **env})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"uvicorn exited with {process.returncode}")
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the API did not become ready in 60 s")
            time.sleep(0.2)
        yield base, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def server_cpu_seconds(process: subprocess.Popen[bytes]) -> float:
    """User + system CPU of the uvicorn process and its worker processes so far."""
    parent = psutil.Process(process.pid)
    total = 0.0
    for proc in [parent, *parent.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


# -- submissions ----------------------------------------------------------------------------------------------

TEMPLATES = (
    "{w:.4f}*code + 0.3*math - {v:g}*toxic",
    "base + code - {w:.4f}*toxic",
    "ties({w:.4f}*code, 0.3*math, density=0.5)",
    "svd({w:.4f}*code + math, rank=8)",
)


def expression_for(k: int) -> str:
    """A distinct expression per ``k`` (distinct weights, so distinct plan hashes), over four shapes."""
    return TEMPLATES[k % len(TEMPLATES)].format(w=0.5 + k / 100_000, v=0.1 + (k % 7) / 100)


@dataclass
class LoadResult:
    label: str
    latencies: list[float]
    wall: float
    statuses: dict[int, int]
    first_error: str | None
    server_cpu: float
    client_cpu: float

    @property
    def count(self) -> int:
        return len(self.latencies)

    def ms(self, q: float) -> float:
        return percentile(self.latencies, q) * 1000


async def _fire(
    base_url: str,
    token: str,
    bodies: list[dict[str, Any]],
    clients: int,
    rate: float | None,
    expect: int,
) -> tuple[list[float], float, dict[int, int], str | None]:
    latencies: list[float] = [0.0] * len(bodies)
    statuses: dict[int, int] = {}
    first_error: list[str] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=120, headers=headers) as client:

        async def one(k: int, due: float) -> None:
            response = await client.post("/v1/merges", json=bodies[k])
            latencies[k] = time.perf_counter() - due
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            if response.status_code != expect and not first_error:
                first_error.append(f"{response.status_code} {response.text[:300]}")

        started = time.perf_counter()
        if rate is None:  # closed loop: each client sends its next request when it has an answer
            queue = iter(range(len(bodies)))

            async def loop() -> None:
                for k in queue:
                    await one(k, time.perf_counter())

            await asyncio.gather(*(loop() for _ in range(clients)))
        else:  # open loop: Poisson arrivals; latency from the scheduled arrival, at most `clients` in flight
            gaps = random.Random(7)
            slots = asyncio.Semaphore(clients)
            due = started
            tasks = []

            async def limited(k: int, at: float) -> None:
                async with slots:
                    await one(k, at)

            for k in range(len(bodies)):
                due += gaps.expovariate(rate)
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(limited(k, due)))
            await asyncio.gather(*tasks)
        wall = time.perf_counter() - started
    return latencies, wall, statuses, first_error[0] if first_error else None


def run_load(
    label: str,
    base_url: str,
    token: str,
    process: subprocess.Popen[bytes],
    bodies: list[dict[str, Any]],
    clients: int,
    rate: float | None,
    expect: int = 202,
) -> LoadResult:
    server_before, client_before = server_cpu_seconds(process), time.process_time()
    latencies, wall, statuses, first_error = asyncio.run(_fire(base_url, token, bodies, clients, rate, expect))
    return LoadResult(
        label,
        latencies,
        wall,
        statuses,
        first_error,
        server_cpu_seconds(process) - server_before,
        time.process_time() - client_before,
    )


def upload_demo_adapters(base_url: str, token: str, folder: Path) -> list[str]:
    """Write the demo's three adapters (code, math, toxic) and upload them over the API."""
    refs = []
    with httpx.Client(base_url=base_url, timeout=60, headers={"Authorization": f"Bearer {token}"}) as client:
        for path in write_demo_adapters(folder):
            files = [
                ("files", (name, (path / name).read_bytes(), "application/octet-stream"))
                for name in ("adapter_config.json", "adapter_model.safetensors")
            ]
            response = client.post("/v1/adapters", data={"name": path.name, "tags": "bench"}, files=files)
            if response.status_code != 201:
                raise RuntimeError(f"upload of {path.name} answered {response.status_code}: {response.text}")
            refs.append(str(response.json()["version"]["ref"]))
    return refs


def mark_succeeded(engine: Engine, job_id: str, version_ref: str) -> None:
    """Pretend a worker ran ``job_id`` into ``version_ref``, so that the same plan is answered from it."""
    name, number = version_ref.split("@")
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE merge_jobs SET status = 'succeeded', engine_seconds = 1.0, result_version_id = "
                "(SELECT v.id FROM adapter_versions v JOIN adapters a ON a.id = v.adapter_id "
                "WHERE a.name = :name AND v.number = :number) WHERE id = :job"
            ),
            {"name": name, "number": int(number), "job": job_id},
        )


@dataclass
class Phases:
    """One sequential submission, in-process, split as the route spends it."""

    auth: list[float] = field(default_factory=list)
    compile_and_record: list[float] = field(default_factory=list)
    database: list[float] = field(default_factory=list)
    statements: list[int] = field(default_factory=list)
    commit: list[float] = field(default_factory=list)
    enqueue: list[float] = field(default_factory=list)


def profile_submissions(database_url: str, broker_url: str, token: str, count: int, home: Path) -> Phases:
    """Run the route's steps in this process (same settings, dispatcher and code as the server), timed."""
    from api.dispatch import CeleryDispatcher
    from api.merges import submit
    from api.runtime import build_runtime
    from registry.services import tokens
    from registry.settings import Settings

    settings = Settings(database_url=database_url, broker_url=broker_url, home=home)
    runtime = build_runtime(settings)
    dispatcher = CeleryDispatcher(settings)
    phases = Phases()
    log = StatementLog()
    with log.attached(runtime.engine):
        for k in range(count + 10):
            log.clear()
            session = runtime.sessions()
            try:
                t0 = time.perf_counter()
                tokens.authenticate(session, token)
                t1 = time.perf_counter()
                submission = submit(session, settings, expression_for(900_000 + k), f"profile-{k}", [])
                t2 = time.perf_counter()
                db_before_commit, statements = log.seconds, len(log.records)
                session.commit()
                t3 = time.perf_counter()
                dispatcher.enqueue_merge(submission.job.id)
                t4 = time.perf_counter()
            finally:
                session.close()
            if k < 10:
                continue
            phases.auth.append(t1 - t0)
            phases.compile_and_record.append(t2 - t1)
            phases.database.append(db_before_commit)
            phases.statements.append(statements)
            phases.commit.append(t3 - t2)
            phases.enqueue.append(t4 - t3)
    runtime.engine.dispose()
    return phases


# -- the report ---------------------------------------------------------------------------------------------------


def print_lineage(title: str, timings: list[Timing]) -> None:
    print(f"\n  {title}")
    print(f"    {'query':<22} {'nodes':>5} {'edges':>5} {'median ms':>10} {'p99 ms':>8} {'p99 / target':>13}")
    for t in timings:
        print(
            f"    {t.label:<22} {t.nodes:>5} {t.edges:>5} {t.median_ms:>10.2f} {t.p99_ms:>8.2f} "
            f"{t.p99_ms / LINEAGE_TARGET_MS:>12.2f}x"
        )


def print_load(results: list[LoadResult]) -> None:
    print(f"\n  POST /v1/merges (ms; target p99 < {SUBMIT_P99_TARGET_MS:g}; CPU per request from /proc)")
    print(
        f"    {'run':<34} {'n':>5} {'p50':>7} {'p95':>7} {'p99':>7} {'max':>7} {'req/s':>6} "
        f"{'p99/target':>10} {'server CPU':>10} {'client CPU':>10}  statuses"
    )
    for r in results:
        print(
            f"    {r.label:<34} {r.count:>5} {r.ms(50):>7.1f} {r.ms(95):>7.1f} {r.ms(99):>7.1f} {r.ms(100):>7.1f} "
            f"{r.count / r.wall:>6.1f} {r.ms(99) / SUBMIT_P99_TARGET_MS:>9.2f}x "
            f"{r.server_cpu / r.count * 1000:>7.1f} ms {r.client_cpu / r.count * 1000:>7.1f} ms  {r.statuses}"
        )
        if r.first_error:
            print(f"      first unexpected answer: {r.first_error}")


def print_phases(phases: Phases) -> None:
    def med(values: list[float]) -> str:
        return f"{statistics.median(values) * 1000:.2f}"

    print(f"\n  one submission in-process, sequential, median of {len(phases.auth)} (ms):")
    print(
        f"    auth {med(phases.auth)} | submit (compile + record) {med(phases.compile_and_record)}, of which "
        f"{statistics.median(phases.statements):.0f} statements {med(phases.database)} | commit "
        f"{med(phases.commit)} | enqueue to Redis {med(phases.enqueue)}"
    )


def machine() -> str:
    """CPU model and count, PostgreSQL and Redis versions: what the figures were measured on."""
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return f"{os.cpu_count()} x {model}, Python {sys.version.split()[0]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", type=int, default=10_000, help="adapter versions in the lineage registry")
    parser.add_argument("--depth", type=int, default=50, help="versions per chain (at most 64 are walked)")
    parser.add_argument("--fanin-every", type=int, default=5, help="every Nth version has a second parent")
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="7b", help="module table of each version")
    parser.add_argument("--queries", type=int, default=200, help="lineage queries per case and transport")
    parser.add_argument("--clients", type=int, default=50, help="concurrent submission clients")
    parser.add_argument("--requests", type=int, default=1000, help="timed submissions")
    parser.add_argument("--reuse-requests", type=int, default=500, help="timed submissions answered by reuse")
    parser.add_argument("--rate", type=float, default=20.0, help="then open loop at this many submissions/s (0: no)")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    parser.add_argument(
        "--plain-uvicorn", action="store_true", help="serve with `uvicorn --workers N` as is (uvicorn#3149 applies)"
    )
    parser.add_argument("--only", choices=("lineage", "submit"), default=None)
    parser.add_argument("--explain", action="store_true", help="EXPLAIN ANALYZE the recursive lineage walk")
    parser.add_argument("--pg-admin", default="host=127.0.0.1 port=5432 user=postgres dbname=test")
    parser.add_argument("--pg-server", default="postgresql+psycopg://postgres@127.0.0.1:5432")
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/13", help="a spare Redis db; flushed at the end")
    args = parser.parse_args()
    if not 1 <= args.depth <= 64 or args.versions < args.depth:
        parser.error("--depth must be 1..64 and --versions at least --depth")

    print(f"{machine()}; load average at start {os.getloadavg()[0]:.2f}")
    with scratch_database(args.pg_admin, args.pg_server) as url, tempfile.TemporaryDirectory() as home:
        engine = make_engine(url)
        upgrade_to_head(engine)
        sessions = make_session_factory(engine)
        seeded = seed_registry(
            engine, versions=args.versions, depth=args.depth, fanin_every=args.fanin_every, layout=LAYOUTS[args.layout]
        )
        with session_scope(sessions) as session:
            token = create_token(session, "bench", "write").secret
            pg_version = session.execute(text("SHOW server_version")).scalar_one()
        redis_version = redis.Redis.from_url(args.broker).info("server")["redis_version"]
        print(f"PostgreSQL {pg_version}, Redis {redis_version}")
        print(
            f"PostgreSQL scratch database: {seeded.versions} versions in {seeded.chains} chains {seeded.depth} deep, "
            f"{seeded.edges} lineage edges, {seeded.jobs} merge jobs ({args.layout} module tables); "
            f"seeded in {seeded.seconds:.1f} s"
        )
        if args.only != "submit":
            timings = [lineage_in_process(sessions, seeded, case, args.queries) for case in LINEAGE_CASES]
            print_lineage(f"lineage, in-process (service on a session), {args.queries} queries each", timings)
            lineage_breakdown(engine, sessions, seeded, args.explain)
        env = {
            "GRAFT_DATABASE_URL": url,
            "GRAFT_BROKER_URL": args.broker,
            "GRAFT_HOME": home,
            "GRAFT_ARTIFACTS_DIR": str(Path(home) / "artifacts"),
        }
        broker = redis.Redis.from_url(args.broker)
        try:
            with api_server(env, args.workers, args.plain_uvicorn) as (base, process):
                served = f"{'uvicorn --workers' if args.plain_uvicorn else 'bench.serve, uvicorn'} {args.workers}"
                print(f"\nAPI at {base} ({served} worker process(es)), broker {args.broker}")
                if args.only != "submit":
                    timings = [lineage_over_http(base, seeded, case, args.queries) for case in LINEAGE_CASES]
                    print_lineage("lineage over HTTP, one client, keep-alive", timings)
                if args.only != "lineage":
                    run_submissions(args, engine, base, token, process, Path(home), broker)
            if args.only != "lineage":
                print_phases(profile_submissions(url, args.broker, token, 100, Path(home)))
        finally:
            broker.flushdb()
            broker.close()
            engine.dispose()
    print(f"\nload average at the end {os.getloadavg()[0]:.2f} (other processes on the machine count too)")


def run_submissions(
    args: argparse.Namespace,
    engine: Engine,
    base: str,
    token: str,
    process: subprocess.Popen[bytes],
    home: Path,
    broker: redis.Redis,
) -> None:
    refs = upload_demo_adapters(base, token, home / "adapters")
    used = [0]

    def fresh(count: int) -> list[dict[str, Any]]:
        """``count`` distinct submissions: every one compiles, records a queued job and is sent to Redis."""
        start, used[0] = used[0], used[0] + count
        return [{"expression": expression_for(k), "name": f"bench-{k}"} for k in range(start, start + count)]

    clients = args.clients
    run_load("warm-up", base, token, process, fresh(2 * clients), clients, None)
    queued_before = int(broker.llen("merge"))
    results = [run_load("one client, sequential", base, token, process, fresh(200), 1, None)]
    closed = run_load(f"{clients} clients, closed loop", base, token, process, fresh(args.requests), clients, None)
    results.append(closed)
    if args.rate:
        label = f"open loop, {args.rate:g}/s (≤ {clients} in flight)"
        results.append(run_load(label, base, token, process, fresh(args.requests // 2), clients, args.rate))
    accepted = sum(r.statuses.get(202, 0) for r in results)
    queued = int(broker.llen("merge")) - queued_before
    if args.reuse_requests:
        expression = "0.5*code + 0.5*math"
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}) as client:
            first = client.post("/v1/merges", json={"expression": expression, "name": "reused"})
            first.raise_for_status()
        mark_succeeded(engine, first.json()["id"], refs[0])
        same = [{"expression": expression, "name": "reused"} for _ in range(args.reuse_requests)]
        results.append(run_load(f"plan reuse, {clients} clients, closed", base, token, process, same, clients, None))
    print_load(results)
    print(
        f"    Redis db: {queued} merge tasks queued by the timed new-job runs ({accepted} answered 202); "
        f"uploaded {', '.join(refs)}"
    )


if __name__ == "__main__":
    main()
