"""Operator overrides and delivery status: what an operator set, when the registration
last delivered, why it last failed, and a quarantine for refused tokens.

Revision ID: 0002
Revises: 0001
Create Date: 2025-11-25

Only nullable columns and one with a constant default, so every database adds them
in place (SQLite's ALTER TABLE ADD COLUMN included) and existing rows keep working:
NULL means "no override" and "never", failure_count starts at 0.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_ADDED = (
    "operator_priority",
    "operator_silent",
    "last_success_at",
    "last_error_at",
    "last_error",
    "failure_count",
    "quarantined_until",
)


def upgrade() -> None:
    op.add_column("registrations", sa.Column("operator_priority", sa.String(16), nullable=True))
    op.add_column("registrations", sa.Column("operator_silent", sa.Boolean(), nullable=True))
    # Microseconds since the epoch, like created_at (see 0001).
    op.add_column("registrations", sa.Column("last_success_at", sa.BigInteger(), nullable=True))
    op.add_column("registrations", sa.Column("last_error_at", sa.BigInteger(), nullable=True))
    op.add_column("registrations", sa.Column("last_error", sa.Text(), nullable=True))
    op.add_column(
        "registrations",
        sa.Column("failure_count", sa.Integer(), nullable=False, server_default="0"),
    )
    op.add_column("registrations", sa.Column("quarantined_until", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    # Batch mode: SQLite drops columns by copying the table.
    with op.batch_alter_table("registrations") as batch:
        for column in reversed(_ADDED):
            batch.drop_column(column)
