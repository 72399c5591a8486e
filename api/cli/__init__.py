"""The ``graft`` command line: one module per group of commands, all on the Typer app in :mod:`api.cli.base`.

- :mod:`api.cli.adapters`: ``register``, ``list``, ``show``, ``lineage``, ``export``
- :mod:`api.cli.merges`: ``plan``, ``functions``, ``merge`` (local or ``--remote``), ``analyze``
- :mod:`api.cli.hub`: ``publish``
- :mod:`api.cli.tokens`: ``token create|list|revoke``
- :mod:`api.cli.service`: ``migrate``, ``serve``, ``worker``

Importing a module registers its commands; the order below is the order ``graft --help`` lists them in.
"""

from __future__ import annotations

from api.cli import adapters, hub, merges, service, tokens  # noqa: F401 (registers the commands)
from api.cli.base import app

__all__ = ["app", "main"]


def main() -> None:
    app()
