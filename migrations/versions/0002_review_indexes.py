"""Indexes for the review queue at 100,000+ results: images by class and by source.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_images_class_name", "images", ["class_name"])
    op.create_index("ix_images_source_id", "images", ["source_id"])
    op.create_index("ix_thresholds_class_name", "thresholds", ["class_name"])


def downgrade() -> None:
    op.drop_index("ix_thresholds_class_name", "thresholds")
    op.drop_index("ix_images_source_id", "images")
    op.drop_index("ix_images_class_name", "images")
