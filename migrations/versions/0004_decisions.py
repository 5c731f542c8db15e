"""Decisions the line can act on: a decision stored with each live result (by the threshold row in force),
provisional thresholds and a review band, the audit sample, and the outbox of events for the line.

Existing results keep ``decision`` None (they were decided at read time only); existing thresholds are
``reviewed`` with no band.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("thresholds") as batch:
        batch.add_column(sa.Column("kind", sa.String(16), nullable=False, server_default="reviewed"))
        batch.add_column(sa.Column("review_band", sa.Float, nullable=False, server_default="0"))
    with op.batch_alter_table("thresholds") as batch:
        batch.alter_column("kind", server_default=None, existing_type=sa.String(16), existing_nullable=False)
        batch.alter_column("review_band", server_default=None, existing_type=sa.Float, existing_nullable=False)
    with op.batch_alter_table("results") as batch:
        batch.add_column(sa.Column("decision", sa.String(8), nullable=True))
        batch.add_column(sa.Column("threshold_id", sa.Integer, nullable=True))
        batch.add_column(sa.Column("audit", sa.Boolean, nullable=False, server_default=sa.false()))
        batch.create_foreign_key("fk_results_threshold_id_thresholds", "thresholds", ["threshold_id"], ["id"])
    with op.batch_alter_table("results") as batch:
        batch.alter_column("audit", server_default=None, existing_type=sa.Boolean, existing_nullable=False)
    op.create_table(
        "outbox",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("result_id", sa.Integer, nullable=False),
        sa.Column("sink", sa.String(100), nullable=False),
        sa.Column("source_id", sa.Integer, nullable=True),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("next_attempt_at", sa.DateTime, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("sent_at", sa.DateTime, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_outbox"),
        sa.ForeignKeyConstraint(["result_id"], ["results.id"], name="fk_outbox_result_id_results"),
        sa.ForeignKeyConstraint(["source_id"], ["sources.id"], name="fk_outbox_source_id_sources"),
        sa.UniqueConstraint("result_id", "sink", name="uq_outbox_result_id_sink"),
    )
    op.create_index("ix_outbox_sink_status", "outbox", ["sink", "status"])


def downgrade() -> None:
    op.drop_index("ix_outbox_sink_status", "outbox")
    op.drop_table("outbox")
    with op.batch_alter_table("results") as batch:
        batch.drop_constraint("fk_results_threshold_id_thresholds", type_="foreignkey")
        batch.drop_column("audit")
        batch.drop_column("threshold_id")
        batch.drop_column("decision")
    with op.batch_alter_table("thresholds") as batch:
        batch.drop_column("review_band")
        batch.drop_column("kind")
