"""Lineage walks: ``walk_lineage`` (one recursive query) and ``lineage_graph`` over a small DAG of versions.

The DAG is built with the real path: leaves registered from PEFT folders, merges submitted and run by the
pipeline (which records one edge per operand)::

    a   b   c
     \\ /    |
     ab = a + b         (depth 1 from ab)
       \\    |
        abc = ab - c    (a merge of a merge)
          \\
  top = 0.5*a + 0.5*abc (a diamond: a is reached at depth 1 and at depth 3)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker

from api.merges import submit_merge
from registry import repositories as repo
from registry.db import session_scope
from registry.errors import InvalidInput
from registry.models import AdapterVersion, LineageEdge
from registry.services.adapters import register_folder
from registry.services.lineage import lineage_graph
from registry.settings import Settings
from workers.pipeline import run_merge_job

MODULES = {
    "base_model.model.model.layers.0.self_attn.q_proj": (8, 6),
    "base_model.model.model.layers.0.self_attn.v_proj": (4, 6),
}


@dataclass(frozen=True)
class Dag:
    ids: dict[str, int]  # adapter name → version id (all are version 1)

    def name(self, version_id: int) -> str:
        return {v: k for k, v in self.ids.items()}[version_id]


def merge(sessions: sessionmaker[Session], store, settings: Settings, expression: str, name: str) -> int:
    with session_scope(sessions) as session:
        job, _plan = submit_merge(session, settings, expression, name, [])
        job_id = job.id
    return run_merge_job(job_id, session_factory=sessions, store=store).version_id


@pytest.fixture
def dag(sessions, store, make_adapter, tmp_path: Path) -> Dag:
    settings = Settings(home=tmp_path / "home")
    ids: dict[str, int] = {}
    with session_scope(sessions) as session:
        for seed, name in enumerate(("a", "b", "c"), start=1):
            folder = make_adapter(name, seed=seed, rank=2, alpha=2.0, modules=MODULES)
            ids[name] = register_folder(session, store, folder, name).version.id
    ids["ab"] = merge(sessions, store, settings, "a + b", "ab")
    ids["abc"] = merge(sessions, store, settings, "ab - c", "abc")
    ids["top"] = merge(sessions, store, settings, "0.5*a + 0.5*abc", "top")
    return Dag(ids)


def edges(dag: Dag, rows) -> set[tuple[str, str, float, int]]:
    """Walk rows as ``(child, parent, coefficient, depth)`` with names instead of ids."""
    return {(dag.name(r.child_id), dag.name(r.parent_id), r.coefficient, r.depth) for r in rows}


# -- walk_lineage ------------------------------------------------------------------------------------------


def test_ancestors_of_a_merge_of_a_merge(sessions, dag):
    with sessions() as session:
        rows = repo.walk_lineage(session, dag.ids["abc"], "up")
    assert edges(dag, rows) == {
        ("abc", "ab", 1.0, 1),
        ("abc", "c", -1.0, 1),
        ("ab", "a", 1.0, 2),
        ("ab", "b", 1.0, 2),
    }
    assert [r.depth for r in rows] == sorted(r.depth for r in rows), "rows come nearest first"
    assert {(r.role, r.strategy) for r in rows} == {("operand", "linear")}


def test_ancestors_through_a_diamond_list_each_edge_once(sessions, dag):
    with sessions() as session:
        rows = repo.walk_lineage(session, dag.ids["top"], "up")
    assert edges(dag, rows) == {
        ("top", "a", 0.5, 1),
        ("top", "abc", 0.5, 1),
        ("abc", "ab", 1.0, 2),
        ("abc", "c", -1.0, 2),
        ("ab", "a", 1.0, 3),
        ("ab", "b", 1.0, 3),
    }
    assert len(rows) == len({(r.child_id, r.parent_id, r.role) for r in rows})


def test_descendants_of_a_leaf(sessions, dag):
    with sessions() as session:
        from_a = repo.walk_lineage(session, dag.ids["a"], "down")
        from_c = repo.walk_lineage(session, dag.ids["c"], "down")
    # a → top directly (depth 1) and a → ab → abc → top (depth 3): the edge top←abc is found once
    assert edges(dag, from_a) == {
        ("ab", "a", 1.0, 1),
        ("top", "a", 0.5, 1),
        ("abc", "ab", 1.0, 2),
        ("top", "abc", 0.5, 3),
    }
    assert edges(dag, from_c) == {("abc", "c", -1.0, 1), ("top", "abc", 0.5, 2)}


def test_leaves_have_no_ancestors_and_the_top_has_no_descendants(sessions, dag):
    with sessions() as session:
        assert repo.walk_lineage(session, dag.ids["b"], "up") == []
        assert repo.walk_lineage(session, dag.ids["top"], "down") == []


def test_depth_limit_stops_the_walk(sessions, dag):
    with sessions() as session:
        one = repo.walk_lineage(session, dag.ids["top"], "up", max_depth=1)
        two = repo.walk_lineage(session, dag.ids["top"], "up", max_depth=2)
        down = repo.walk_lineage(session, dag.ids["b"], "down", max_depth=2)
    assert edges(dag, one) == {("top", "a", 0.5, 1), ("top", "abc", 0.5, 1)}
    assert {r.depth for r in two} == {1, 2}
    assert len(two) == 4
    assert edges(dag, down) == {("ab", "b", 1.0, 1), ("abc", "ab", 1.0, 2)}


def test_a_walk_is_one_query(sessions, dag, db_engine):
    statements: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany):
        statements.append(statement)

    with sessions() as session:
        session.connection()  # begin before listening, so only the walk itself is counted
        event.listen(db_engine, "before_cursor_execute", count)
        try:
            rows = repo.walk_lineage(session, dag.ids["top"], "up")
        finally:
            event.remove(db_engine, "before_cursor_execute", count)
    assert len(rows) == 6
    assert len(statements) == 1, statements


def test_a_cycle_inserted_by_hand_terminates(sessions, dag):
    # Lineage is a DAG by construction; a hand-made cycle must still not loop forever.
    with session_scope(sessions) as session:
        session.add(LineageEdge(child_id=dag.ids["a"], parent_id=dag.ids["top"], coefficient=2.0))
    with sessions() as session:
        rows = repo.walk_lineage(session, dag.ids["a"], "up", max_depth=10)
    pairs = [(dag.name(r.child_id), dag.name(r.parent_id)) for r in rows]
    assert len(pairs) == len(set(pairs)), "each edge is listed once"
    # a ← top ← {a, abc} ← ... ← a again: every edge of the loop, each at the depth it is first reached
    assert {pair: r.depth for pair, r in zip(pairs, rows, strict=True)} == {
        ("a", "top"): 1,
        ("top", "a"): 2,
        ("top", "abc"): 2,
        ("abc", "ab"): 3,
        ("abc", "c"): 3,
        ("ab", "a"): 4,
        ("ab", "b"): 4,
    }


def test_edges_inserted_directly_are_walked(sessions, dag):
    # A chain b ← ab ← ... built by hand beyond what merges produce: c is made a child of b.
    with session_scope(sessions) as session:
        session.add(LineageEdge(child_id=dag.ids["c"], parent_id=dag.ids["b"], coefficient=0.25, strategy="manual"))
    with sessions() as session:
        rows = repo.walk_lineage(session, dag.ids["abc"], "up")
    found = {(dag.name(r.child_id), dag.name(r.parent_id)): (r.coefficient, r.strategy, r.depth) for r in rows}
    assert found[("c", "b")] == (0.25, "manual", 2)
    assert found[("ab", "b")] == (1.0, "linear", 2)


# -- lineage_graph -------------------------------------------------------------------------------------------


def graph_edges(graph) -> set[tuple[str, str, float]]:
    return {(e["child"], e["parent"], e["coefficient"]) for e in graph["edges"]}


def test_graph_up(sessions, dag):
    with sessions() as session:
        graph = lineage_graph(session, session.get(AdapterVersion, dag.ids["abc"]), "up")
    assert graph["root"] == "abc@1"
    assert graph_edges(graph) == {
        ("abc@1", "ab@1", 1.0),
        ("abc@1", "c@1", -1.0),
        ("ab@1", "a@1", 1.0),
        ("ab@1", "b@1", 1.0),
    }
    nodes = {n["ref"]: n for n in graph["nodes"]}
    assert set(nodes) == {"abc@1", "ab@1", "a@1", "b@1", "c@1"}
    assert [n["id"] for n in graph["nodes"]] == sorted(n["id"] for n in graph["nodes"])
    assert nodes["abc@1"]["source"] == "merge"
    assert nodes["abc@1"]["expression"] == "ab - c"
    assert nodes["a@1"]["source"] == "upload" and nodes["a@1"]["expression"] is None
    assert all(len(n["sha256"]) == 64 for n in graph["nodes"])
    assert {(e["role"], e["strategy"]) for e in graph["edges"]} == {("operand", "linear")}


def test_graph_down(sessions, dag):
    with sessions() as session:
        graph = lineage_graph(session, session.get(AdapterVersion, dag.ids["b"]), "down")
    assert graph["root"] == "b@1"
    assert graph_edges(graph) == {("ab@1", "b@1", 1.0), ("abc@1", "ab@1", 1.0), ("top@1", "abc@1", 0.5)}
    assert {n["ref"] for n in graph["nodes"]} == {"b@1", "ab@1", "abc@1", "top@1"}


def test_graph_both_directions(sessions, dag):
    with sessions() as session:
        graph = lineage_graph(session, session.get(AdapterVersion, dag.ids["ab"]), "both")
    assert graph_edges(graph) == {
        ("ab@1", "a@1", 1.0),
        ("ab@1", "b@1", 1.0),
        ("abc@1", "ab@1", 1.0),
        ("top@1", "abc@1", 0.5),
    }
    # c and the direct edge top ← a are neither above nor below ab
    assert {n["ref"] for n in graph["nodes"]} == {"a@1", "b@1", "ab@1", "abc@1", "top@1"}


def test_graph_depth_limit(sessions, dag):
    with sessions() as session:
        top = session.get(AdapterVersion, dag.ids["top"])
        shallow = lineage_graph(session, top, "up", depth=1)
        full = lineage_graph(session, top, "up", depth=64)
    assert graph_edges(shallow) == {("top@1", "a@1", 0.5), ("top@1", "abc@1", 0.5)}
    assert {n["ref"] for n in shallow["nodes"]} == {"top@1", "a@1", "abc@1"}
    assert len(full["edges"]) == 6
    assert {n["ref"] for n in full["nodes"]} == {"top@1", "a@1", "b@1", "c@1", "ab@1", "abc@1"}


def test_graph_of_a_lone_version_is_just_the_root(sessions, dag):
    with sessions() as session:
        graph = lineage_graph(session, session.get(AdapterVersion, dag.ids["c"]), "up")
    assert graph["edges"] == []
    assert [n["ref"] for n in graph["nodes"]] == ["c@1"]


@pytest.mark.parametrize(
    ("direction", "depth", "fragment"),
    [
        ("sideways", 4, "direction must be one of up, down, both"),
        ("UP", 4, "direction"),
        ("up", 0, "depth must be between 1 and 64"),
        ("up", -1, "depth must be between 1 and 64"),
        ("down", 65, "depth must be between 1 and 64"),
    ],
)
def test_graph_rejects_bad_direction_and_depth(session, store, make_adapter, direction, depth, fragment):
    root = register_folder(session, store, make_adapter("a", rank=2, modules=MODULES), "a").version
    with pytest.raises(InvalidInput) as info:
        lineage_graph(session, root, direction, depth)
    assert info.value.code == "invalid_input"
    assert fragment in info.value.message
