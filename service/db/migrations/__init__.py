"""Alembic migrations (a package so that ``pip install .`` ships them; Alembic loads env.py by path)."""
