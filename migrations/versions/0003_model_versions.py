"""Model versions end to end: a job per (image, model version), promotions in the database, thresholds
per (class, model version), reviews that know the result they judged.

Existing rows are carried over, nothing dropped:

* ``model_versions`` get a ``digest``; a pre-0003 version had no content identity, so its digest is the
  hash of ``legacy``, its name and its stored manifest (unique, and never equal to a new identity);
* every stored result becomes a ``done`` live job for its (image, version); images still pending or
  claimed stay ``pending`` without a job: the next watcher or worker routes them to the version active for
  their class (``routing.route_unrouted``);
* a threshold belongs to the version that scored the latest result of its class (None if the class has
  no result yet: shown as a pre-0003 threshold);
* a review points at the latest result of its image that existed when the review was written.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

import hashlib

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    conn = op.get_bind()
    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(sa.Column("digest", sa.String(64), nullable=True))
        batch.add_column(sa.Column("registry_name", sa.String(200), nullable=True))
    for row in conn.execute(sa.text("SELECT id, name, manifest FROM model_versions")).all():
        digest = hashlib.sha256(f"legacy\0{row.name}\0{row.manifest}".encode()).hexdigest()
        conn.execute(sa.text("UPDATE model_versions SET digest = :d WHERE id = :i"), {"d": digest, "i": row.id})
    with op.batch_alter_table("model_versions") as batch:
        batch.alter_column("digest", existing_type=sa.String(64), nullable=False)
        batch.create_unique_constraint("uq_model_versions_digest", ["digest"])

    with op.batch_alter_table("sources") as batch:
        batch.add_column(sa.Column("pinned_version_id", sa.Integer, nullable=True))
        batch.add_column(sa.Column("default_version_id", sa.Integer, nullable=True))
        batch.create_foreign_key("fk_sources_pinned_version_id_model_versions", "model_versions",
                                 ["pinned_version_id"], ["id"])
        batch.create_foreign_key("fk_sources_default_version_id_model_versions", "model_versions",
                                 ["default_version_id"], ["id"])

    op.create_table(
        "promotions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("model_version_id", sa.Integer, nullable=False),
        sa.Column("class_name", sa.String(200), nullable=True),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("created_by", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("note", sa.Text, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_promotions"),
        sa.ForeignKeyConstraint(["model_version_id"], ["model_versions.id"],
                                name="fk_promotions_model_version_id_model_versions"),
    )
    op.create_index("ix_promotions_class_name", "promotions", ["class_name"])

    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("image_id", sa.Integer, nullable=False),
        sa.Column("model_version_id", sa.Integer, nullable=False),
        sa.Column("purpose", sa.String(16), nullable=False),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("claimed_by", sa.String(200), nullable=True),
        sa.Column("lease_until", sa.DateTime, nullable=True),
        sa.Column("next_attempt_at", sa.DateTime, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"], name="fk_jobs_image_id_images"),
        sa.ForeignKeyConstraint(["model_version_id"], ["model_versions.id"],
                                name="fk_jobs_model_version_id_model_versions"),
        sa.UniqueConstraint("image_id", "model_version_id", name="uq_jobs_image_id_model_version_id"),
    )
    op.create_index("ix_jobs_model_version_id_status_priority", "jobs", ["model_version_id", "status", "priority"])
    conn.execute(sa.text(
        "INSERT INTO jobs (image_id, model_version_id, purpose, priority, status, attempts, next_attempt_at, "
        "created_at, updated_at) "
        "SELECT r.image_id, r.model_version_id, 'live', 100, 'done', i.attempts, r.created_at, r.created_at, "
        "r.created_at FROM results r JOIN images i ON i.id = r.image_id ORDER BY r.id"))
    conn.execute(sa.text("UPDATE images SET status = 'pending', claimed_by = NULL, lease_until = NULL "
                         "WHERE status = 'claimed'"))

    with op.batch_alter_table("thresholds") as batch:
        batch.add_column(sa.Column("model_version_id", sa.Integer, nullable=True))
        batch.drop_constraint("uq_thresholds_class_name_version", type_="unique")
        batch.create_unique_constraint("uq_thresholds_class_name_model_version_id_version",
                                       ["class_name", "model_version_id", "version"])
        batch.create_foreign_key("fk_thresholds_model_version_id_model_versions", "model_versions",
                                 ["model_version_id"], ["id"])
    conn.execute(sa.text(
        "UPDATE thresholds SET model_version_id = (SELECT r.model_version_id FROM results r "
        "JOIN images i ON i.id = r.image_id WHERE i.class_name = thresholds.class_name "
        "ORDER BY r.id DESC LIMIT 1)"))

    with op.batch_alter_table("reviews") as batch:
        batch.add_column(sa.Column("result_id", sa.Integer, nullable=True))
        batch.create_foreign_key("fk_reviews_result_id_results", "results", ["result_id"], ["id"])
    conn.execute(sa.text(
        "UPDATE reviews SET result_id = (SELECT r.id FROM results r WHERE r.image_id = reviews.image_id "
        "AND r.created_at <= reviews.created_at ORDER BY r.id DESC LIMIT 1)"))


def downgrade() -> None:
    with op.batch_alter_table("reviews") as batch:
        batch.drop_constraint("fk_reviews_result_id_results", type_="foreignkey")
        batch.drop_column("result_id")
    op.execute("DELETE FROM thresholds WHERE id NOT IN (SELECT MAX(id) FROM thresholds "
               "GROUP BY class_name, version)")
    with op.batch_alter_table("thresholds") as batch:
        batch.drop_constraint("fk_thresholds_model_version_id_model_versions", type_="foreignkey")
        batch.drop_constraint("uq_thresholds_class_name_model_version_id_version", type_="unique")
        batch.drop_column("model_version_id")
        batch.create_unique_constraint("uq_thresholds_class_name_version", ["class_name", "version"])
    op.drop_index("ix_jobs_model_version_id_status_priority", "jobs")
    op.drop_table("jobs")
    op.drop_index("ix_promotions_class_name", "promotions")
    op.drop_table("promotions")
    with op.batch_alter_table("sources") as batch:
        batch.drop_constraint("fk_sources_default_version_id_model_versions", type_="foreignkey")
        batch.drop_constraint("fk_sources_pinned_version_id_model_versions", type_="foreignkey")
        batch.drop_column("default_version_id")
        batch.drop_column("pinned_version_id")
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_constraint("uq_model_versions_digest", type_="unique")
        batch.drop_column("registry_name")
        batch.drop_column("digest")
