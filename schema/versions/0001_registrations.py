"""Registrations for direct mode: one row per device per user per push service.

Revision ID: 0001
Revises:
Create Date: 2025-11-25

Why the columns look as they do (xmpp_push/storage/sql.py holds the same table for
the code, docs/storage.md explains it to operators):

* `key_hash` = SHA-256 of (owner, push_jid, node), hex. XEP-0357 bounds none of the
  three and RFC 7622 lets a JID part run to 1023 bytes. InnoDB caps an index key at
  3072 bytes (767 with the older COMPACT row format) and utf8mb4 counts 4 bytes per
  character, so a UNIQUE over the three columns themselves fits MySQL only if each is
  cut to 255 characters (3 x 255 x 4 = 3060), and not at all under COMPACT. The hash
  is 64 ASCII characters on every database, and the upsert conflicts on it.
* `token_hash` = SHA-256 of the token: FCM tokens may be long, and PostgreSQL's
  B-tree refuses entries over about 2700 bytes; (target, token_hash) finds the rows
  a push network declared dead.
* `owner` is indexed by its first 191 characters on MySQL (764 bytes, within even
  the COMPACT limit); a prefix index still answers `owner = ...` exactly.
* Times are BIGINT microseconds since the Unix epoch (UTC): an integer comes back
  unchanged from every database and driver, where DOUBLE and TIMESTAMP types differ
  in precision and time-zone handling between them.
* On MySQL the table is utf8mb4 with a binary collation, so that JIDs, nodes and
  tokens compare exactly as on PostgreSQL and SQLite (the server default,
  utf8mb4_general_ci, would match `Alice` with `alice`).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "registrations",
        # SQLite only autoincrements an INTEGER PRIMARY KEY (its rowid).
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("owner", sa.Text(), nullable=False),
        sa.Column("push_jid", sa.Text(), nullable=False),
        sa.Column("node", sa.Text(), nullable=False),
        sa.Column("target", sa.String(16), nullable=False),
        sa.Column("token", sa.Text(), nullable=True),
        sa.Column("token_hash", sa.String(64), nullable=True),
        sa.Column("topic", sa.Text(), nullable=True),
        sa.Column("mode", sa.String(16), nullable=True),
        sa.Column("client_priority", sa.String(16), nullable=True),
        sa.Column("client_silent", sa.Boolean(), nullable=True),
        sa.Column("voip_token", sa.Text(), nullable=True),
        sa.Column("resource", sa.Text(), nullable=True),
        sa.Column("secret", sa.Text(), nullable=True),
        # The publish-options form as JSON text; MEDIUMTEXT as MySQL's TEXT stops at 64 KiB.
        sa.Column(
            "options",
            sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb"),
            nullable=False,
        ),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.UniqueConstraint("key_hash", name="uq_registrations_key_hash"),
        mysql_engine="InnoDB",
        mysql_charset="utf8mb4",
        mysql_collate="utf8mb4_bin",
    )
    op.create_index("ix_registrations_owner", "registrations", ["owner"], mysql_length=191)
    op.create_index("ix_registrations_token", "registrations", ["target", "token_hash"])


def downgrade() -> None:
    op.drop_table("registrations")
