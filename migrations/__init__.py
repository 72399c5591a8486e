"""Alembic environment and versions for the registry schema."""
