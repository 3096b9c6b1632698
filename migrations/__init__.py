"""Alembic migrations: the only way the broker schema changes."""
