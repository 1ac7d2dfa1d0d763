"""Exports on demand: the ``export_requests`` queue (one row per point and format of a finished job, claimed by
workers with a lease, retried, user requests before background ones) and ``evaluations.weights_sha256`` (a
fine-tuned point's trained weights, stored once as a safetensors artefact so that exporting it never retrains).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("evaluations") as batch:
        batch.add_column(sa.Column("weights_sha256", sa.String(length=64), nullable=True))
        batch.create_foreign_key("fk_evaluations_weights_sha256", "artefacts", ["weights_sha256"], ["sha256"])
    op.create_table(
        "export_requests",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("stage", sa.String(length=20), nullable=False),
        sa.Column("format", sa.String(length=20), nullable=False),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("origin", sa.String(length=20), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("worker_id", sa.String(length=100), nullable=True),
        sa.Column("lease_expires_at", TZ, nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("seconds", sa.Float(), nullable=True),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("updated_at", TZ, nullable=False),
        sa.Column("started_at", TZ, nullable=True),
        sa.Column("finished_at", TZ, nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("job_id", "stage", "index", "format", name="uq_export_request_point_format"),
    )
    op.create_index("ix_export_requests_job_id", "export_requests", ["job_id"])
    op.create_index("ix_export_requests_state", "export_requests", ["state"])


def downgrade() -> None:
    op.drop_index("ix_export_requests_state", table_name="export_requests")
    op.drop_index("ix_export_requests_job_id", table_name="export_requests")
    op.drop_table("export_requests")
    with op.batch_alter_table("evaluations") as batch:
        batch.drop_constraint("fk_evaluations_weights_sha256", type_="foreignkey")
        batch.drop_column("weights_sha256")
