"""Shared jobs: ``jobs.workers``, ``job_slots`` (one row per worker holding a shared job), the recording worker
on each evaluation, and (PostgreSQL) the ``optuna`` schema where shared Optuna studies live.

Optuna's RDB storage keeps its own tables and its own ``alembic_version``; in the service's ``public`` schema
that table would clash with ours, so shared studies use ``search_path=optuna`` (see ``service.worker``).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TZ = sa.DateTime(timezone=True)
OPTUNA_SCHEMA = "optuna"


def upgrade() -> None:
    op.add_column("jobs", sa.Column("workers", sa.Integer(), server_default="1", nullable=False))
    op.add_column("evaluations", sa.Column("worker_id", sa.String(length=100), nullable=True))
    op.create_table(
        "job_slots",
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("slot", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("worker_id", sa.String(length=100), nullable=False),
        sa.Column("lease_expires_at", TZ, nullable=False),
        sa.Column("reserved_index", sa.Integer(), nullable=True),
        sa.Column("claimed_at", TZ, nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"]),
        sa.PrimaryKeyConstraint("job_id", "slot"),
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"CREATE SCHEMA IF NOT EXISTS {OPTUNA_SCHEMA}")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP SCHEMA IF EXISTS {OPTUNA_SCHEMA} CASCADE")
    op.drop_table("job_slots")
    with op.batch_alter_table("evaluations") as batch:
        batch.drop_column("worker_id")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("workers")
