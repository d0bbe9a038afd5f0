"""Persistence: SQLAlchemy 2 (async) over SQLite (default) or PostgreSQL, Alembic migrations.

Every query lives here, never in route handlers, and every query is scoped by tenant.
"""
