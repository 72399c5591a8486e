"""``python -m api.cli``: the same as the ``graft`` console script."""

from api.cli import main

main()
