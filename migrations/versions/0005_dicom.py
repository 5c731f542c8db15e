"""DICOM intake: an image row per frame, and the DICOM attributes of each row (no patient data).

``images.frame`` (0 for every existing row) joins the unique key, which becomes (path, sha256, frame): a
multi-frame file has one row per frame with the same path and content. ``dicom_images`` holds the Study,
Series and SOP Instance UIDs, modality, body part and the window of each DICOM image row.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-09
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("frame", sa.Integer, nullable=False, server_default="0"))
        batch.drop_constraint("uq_images_path_sha256", type_="unique")
        batch.create_unique_constraint("uq_images_path_sha256_frame", ["path", "sha256", "frame"])
    with op.batch_alter_table("images") as batch:
        batch.alter_column("frame", server_default=None, existing_type=sa.Integer, existing_nullable=False)
    op.create_table(
        "dicom_images",
        sa.Column("image_id", sa.Integer, nullable=False, autoincrement=False),
        sa.Column("study_uid", sa.String(64), nullable=True),
        sa.Column("series_uid", sa.String(64), nullable=True),
        sa.Column("sop_uid", sa.String(64), nullable=True),
        sa.Column("sop_class_uid", sa.String(64), nullable=True),
        sa.Column("frames", sa.Integer, nullable=False),
        sa.Column("modality", sa.String(16), nullable=True),
        sa.Column("body_part", sa.String(64), nullable=True),
        sa.Column("photometric", sa.String(32), nullable=True),
        sa.Column("transfer_syntax", sa.String(64), nullable=True),
        sa.Column("window", sa.String(100), nullable=True),
        sa.Column("window_source", sa.String(32), nullable=True),
        sa.Column("window_center", sa.Float, nullable=True),
        sa.Column("window_width", sa.Float, nullable=True),
        sa.PrimaryKeyConstraint("image_id", name="pk_dicom_images"),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"], name="fk_dicom_images_image_id_images"),
    )
    op.create_index("ix_dicom_images_sop_uid", "dicom_images", ["sop_uid"])
    op.create_index("ix_dicom_images_study_uid", "dicom_images", ["study_uid"])


def downgrade() -> None:
    op.drop_index("ix_dicom_images_study_uid", "dicom_images")
    op.drop_index("ix_dicom_images_sop_uid", "dicom_images")
    op.drop_table("dicom_images")
    op.execute("DELETE FROM images WHERE frame > 0")  # the extra frames of multi-frame files cannot stay
    with op.batch_alter_table("images") as batch:
        batch.drop_constraint("uq_images_path_sha256_frame", type_="unique")
        batch.create_unique_constraint("uq_images_path_sha256", ["path", "sha256"])
        batch.drop_column("frame")
