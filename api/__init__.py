"""The outside of Graft: the CLI (``graft``) and, later, the REST API."""
