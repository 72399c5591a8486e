"""Lineage: what a version was made from (up) and what was made from it (down)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from registry import repositories as repo
from registry.errors import InvalidInput
from registry.models import AdapterVersion
from registry.services.publications import PublishedRef

DIRECTIONS = ("up", "down", "both")


def lineage_graph(session: Session, version: AdapterVersion, direction: str = "up", depth: int = 64) -> dict[str, Any]:
    """Nodes and edges around ``version``: each edge is ``child ← parent`` with its coefficient and strategy."""
    if direction not in DIRECTIONS:
        raise InvalidInput(f"direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    if not 1 <= depth <= 64:
        raise InvalidInput(f"depth must be between 1 and 64, got {depth}")
    walks = ["up", "down"] if direction == "both" else [direction]
    edges = [row for walk in walks for row in repo.walk_lineage(session, version.id, walk, depth)]
    ids = {version.id} | {e.child_id for e in edges} | {e.parent_id for e in edges}
    versions = repo.version_refs(session, sorted(ids))  # plain columns: a graph needs names, not module tables
    published = repo.latest_published(session, sorted(v.id for v in versions.values() if v.published))
    return {
        "root": version.ref,
        "nodes": [
            {
                "id": v.id,
                "ref": v.ref,
                "source": v.source,
                "expression": v.expression,
                "sha256": v.sha256,
                # Where the version was published (repo, revision = tag, commit, URL), or None.
                "hub": PublishedRef.of(published[v.id]).as_dict() if v.id in published else None,
            }
            for v in sorted(versions.values(), key=lambda v: v.id)
        ],
        "edges": [
            {
                "child": versions[e.child_id].ref,
                "parent": versions[e.parent_id].ref,
                "coefficient": e.coefficient,
                "role": e.role,
                "strategy": e.strategy,
            }
            for e in edges
        ],
    }
