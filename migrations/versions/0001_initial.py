"""Initial schema: sources, images (queue + ledger), model versions, results, thresholds, reviews.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sources",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("class_name", sa.String(200), nullable=False),
        sa.Column("line", sa.String(200), nullable=True),
        sa.Column("recursive", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_sources"),
        sa.UniqueConstraint("path", name="uq_sources_path"),
    )
    op.create_table(
        "images",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("source_id", sa.Integer, nullable=True),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("class_name", sa.String(200), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=True),
        sa.Column("size", sa.BigInteger, nullable=True),
        sa.Column("mtime_ns", sa.BigInteger, nullable=True),
        sa.Column("width", sa.Integer, nullable=True),
        sa.Column("height", sa.Integer, nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("duplicate_of", sa.Integer, nullable=True),
        sa.Column("claimed_by", sa.String(200), nullable=True),
        sa.Column("lease_until", sa.DateTime, nullable=True),
        sa.Column("next_attempt_at", sa.DateTime, nullable=False),
        sa.Column("discovered_at", sa.DateTime, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_images"),
        sa.ForeignKeyConstraint(["source_id"], ["sources.id"], name="fk_images_source_id_sources"),
        sa.ForeignKeyConstraint(["duplicate_of"], ["images.id"], name="fk_images_duplicate_of_images"),
        sa.UniqueConstraint("path", "sha256", name="uq_images_path_sha256"),
    )
    op.create_index("ix_images_status_next_attempt_at", "images", ["status", "next_attempt_at"])
    op.create_index("ix_images_sha256", "images", ["sha256"])
    op.create_index("ix_images_discovered_at", "images", ["discovered_at"])
    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("detector", sa.String(50), nullable=False),
        sa.Column("manifest", sa.Text, nullable=False),
        sa.Column("random_weights", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_model_versions"),
        sa.UniqueConstraint("name", name="uq_model_versions_name"),
    )
    op.create_table(
        "results",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("image_id", sa.Integer, nullable=False),
        sa.Column("model_version_id", sa.Integer, nullable=False),
        sa.Column("image_score", sa.Float, nullable=False),
        sa.Column("text_score", sa.Float, nullable=True),
        sa.Column("topk_score", sa.Float, nullable=True),
        sa.Column("anomaly_map", sa.LargeBinary, nullable=False),
        sa.Column("map_width", sa.Integer, nullable=False),
        sa.Column("map_height", sa.Integer, nullable=False),
        sa.Column("latency_ms", sa.Float, nullable=True),
        sa.Column("worker", sa.String(200), nullable=True),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_results"),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"], name="fk_results_image_id_images"),
        sa.ForeignKeyConstraint(["model_version_id"], ["model_versions.id"],
                                name="fk_results_model_version_id_model_versions"),
        sa.UniqueConstraint("image_id", "model_version_id", name="uq_results_image_id_model_version_id"),
    )
    op.create_index("ix_results_created_at", "results", ["created_at"])
    op.create_index("ix_results_image_score", "results", ["image_score"])
    op.create_table(
        "thresholds",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("class_name", sa.String(200), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("value", sa.Float, nullable=False),
        sa.Column("created_by", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("note", sa.Text, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_thresholds"),
        sa.UniqueConstraint("class_name", "version", name="uq_thresholds_class_name_version"),
    )
    op.create_table(
        "reviews",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("image_id", sa.Integer, nullable=False),
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("reviewer", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_reviews"),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"], name="fk_reviews_image_id_images"),
    )
    op.create_index("ix_reviews_image_id", "reviews", ["image_id"])


def downgrade() -> None:
    for table in ("reviews", "thresholds", "results", "model_versions", "images", "sources"):
        op.drop_table(table)
