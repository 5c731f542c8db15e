"""The database schema: plain tables, SQL-shaped (SQLAlchemy Core). Alembic owns its evolution.

    sources         a watched folder, the class its images belong to, its line, and the model version it
                    is pinned to or falls back to
    images          one row per (path, content) seen: the ledger of content
    model_versions  every model version that can score: identity = ``digest``, a content hash of its
                    effective provenance (detector, backbone and weights hash, head hash, input size,
                    feature layers, scoring options, reference set, role); plus a human ``name``
    promotions      append-only: which version is active (site-wide or per class), which run in shadow
    jobs            the queue: one row per (image, model version) with status, lease, attempts, priority
    results         one per (image, model version): scores and the anomaly map as an 8-bit PNG
    thresholds      decision thresholds per (class, model version), versioned (never updated in place):
                    reviewed (saved by a person) or provisional (computed from the first unlabeled scores)
    outbox          decisions on their way to the line (MQTT, webhook, folders), written with the result
    dicom_images    one per image row of a DICOM file (one per frame): the UIDs that find it in the PACS
                    again, modality, body part, the window used; never patient data (``inspector/dicom.py``)
    reviews         human verdicts, one row per review (history is never overwritten), with the result
                    (and so the model version) the reviewer was shown

All timestamps are naive UTC. Job states: pending -> claimed -> done | failed. ``images.status`` mirrors
the image's *live* job (the one that drives its decision), plus two ledger states: failed at intake (never
queued) and duplicate (same content as another image, linked by duplicate_of and never scored twice).
An image is one frame of its file: ``frame`` is 0 except for the frames of a multi-frame DICOM file, which
get one row each (same path and content, frame 0, 1, ...).
"""

from __future__ import annotations

from sqlalchemy import (
                        BigInteger,
                        Boolean,
                        Column,
                        DateTime,
                        Float,
                        ForeignKey,
                        Index,
                        Integer,
                        LargeBinary,
                        MetaData,
                        String,
                        Table,
                        Text,
                        UniqueConstraint,
)

metadata = MetaData(naming_convention={
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
})

PENDING, CLAIMED, DONE, FAILED, DUPLICATE = "pending", "claimed", "done", "failed", "duplicate"

sources = Table(
    "sources", metadata,
    Column("id", Integer, primary_key=True),
    Column("path", Text, nullable=False, unique=True),
    Column("class_name", String(200), nullable=False),
    Column("line", String(200), nullable=True),
    Column("recursive", Boolean, nullable=False, default=False),
    Column("created_at", DateTime(), nullable=False),
    # the version its watcher was told to use (--model / --detector / [[sources]] model): promotions do
    # not move a pinned source; otherwise the version its watcher loads when nothing is promoted
    Column("pinned_version_id", Integer, ForeignKey("model_versions.id"), nullable=True),
    Column("default_version_id", Integer, ForeignKey("model_versions.id"), nullable=True),
)

images = Table(
    "images", metadata,
    Column("id", Integer, primary_key=True),
    Column("source_id", Integer, ForeignKey("sources.id"), nullable=True),
    Column("path", Text, nullable=False),
    Column("class_name", String(200), nullable=False),
    Column("sha256", String(64), nullable=True),
    Column("size", BigInteger, nullable=True),
    Column("mtime_ns", BigInteger, nullable=True),
    Column("width", Integer, nullable=True),
    Column("height", Integer, nullable=True),
    Column("status", String(16), nullable=False, default=PENDING),
    Column("attempts", Integer, nullable=False, default=0),
    Column("error", Text, nullable=True),
    Column("duplicate_of", Integer, ForeignKey("images.id"), nullable=True),
    Column("claimed_by", String(200), nullable=True),
    Column("lease_until", DateTime(), nullable=True),
    Column("next_attempt_at", DateTime(), nullable=False),
    Column("discovered_at", DateTime(), nullable=False),
    Column("updated_at", DateTime(), nullable=False),
    Column("frame", Integer, nullable=False, default=0),  # 0-based frame of a multi-frame file
    UniqueConstraint("path", "sha256", "frame"),
    Index("ix_images_status_next_attempt_at", "status", "next_attempt_at"),
    Index("ix_images_sha256", "sha256"),
    Index("ix_images_discovered_at", "discovered_at"),
    Index("ix_images_class_name", "class_name"),
    Index("ix_images_source_id", "source_id"),
)

model_versions = Table(
    "model_versions", metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("detector", String(50), nullable=False),
    Column("manifest", Text, nullable=False),
    Column("random_weights", Boolean, nullable=False, default=False),
    Column("created_at", DateTime(), nullable=False),
    Column("digest", String(64), nullable=False, unique=True),
    Column("registry_name", String(200), nullable=True),  # the folder under [registry] path, if registered
)

PROMOTE, SHADOW, UNSHADOW = "promote", "shadow", "unshadow"

promotions = Table(
    "promotions", metadata,
    Column("id", Integer, primary_key=True),
    Column("model_version_id", Integer, ForeignKey("model_versions.id"), nullable=False),
    Column("class_name", String(200), nullable=True),  # None: site-wide
    Column("action", String(16), nullable=False),  # promote | shadow | unshadow
    Column("created_by", String(200), nullable=False),
    Column("created_at", DateTime(), nullable=False),
    Column("note", Text, nullable=True),
    Index("ix_promotions_class_name", "class_name"),
)

LIVE, SHADOWED, BACKFILL, MANUAL = "live", "shadow", "backfill", "manual"
#: claim order: higher first. Live images (and `inspector score`) before shadow scoring before backfills.
PRIORITY = {LIVE: 100, MANUAL: 100, SHADOWED: 50, BACKFILL: 10}

jobs = Table(
    "jobs", metadata,
    Column("id", Integer, primary_key=True),
    Column("image_id", Integer, ForeignKey("images.id"), nullable=False),
    Column("model_version_id", Integer, ForeignKey("model_versions.id"), nullable=False),
    Column("purpose", String(16), nullable=False),  # live | shadow | backfill | manual
    Column("priority", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("error", Text, nullable=True),
    Column("claimed_by", String(200), nullable=True),
    Column("lease_until", DateTime(), nullable=True),
    Column("next_attempt_at", DateTime(), nullable=False),
    Column("created_at", DateTime(), nullable=False),
    Column("updated_at", DateTime(), nullable=False),
    UniqueConstraint("image_id", "model_version_id"),
    Index("ix_jobs_model_version_id_status_priority", "model_version_id", "status", "priority"),
)

results = Table(
    "results", metadata,
    Column("id", Integer, primary_key=True),
    Column("image_id", Integer, ForeignKey("images.id"), nullable=False),
    Column("model_version_id", Integer, ForeignKey("model_versions.id"), nullable=False),
    Column("image_score", Float, nullable=False),
    Column("text_score", Float, nullable=True),
    Column("topk_score", Float, nullable=True),
    Column("anomaly_map", LargeBinary, nullable=False),  # 8-bit grayscale PNG, map * 255
    Column("map_width", Integer, nullable=False),
    Column("map_height", Integer, nullable=False),
    Column("latency_ms", Float, nullable=True),
    Column("worker", String(200), nullable=True),
    Column("created_at", DateTime(), nullable=False),
    # the decision made when the result was stored (live and `score` results only; shadow and backfill
    # results decide nothing): pass | fail | review, by the threshold row in force then (None: none yet)
    Column("decision", String(8), nullable=True),
    Column("threshold_id", Integer, ForeignKey("thresholds.id"), nullable=True),
    Column("audit", Boolean, nullable=False, default=False),  # a pass drawn into the audit sample
    UniqueConstraint("image_id", "model_version_id"),
    Index("ix_results_created_at", "created_at"),
    Index("ix_results_image_score", "image_score"),
)

thresholds = Table(
    "thresholds", metadata,
    Column("id", Integer, primary_key=True),
    Column("class_name", String(200), nullable=False),
    Column("model_version_id", Integer, ForeignKey("model_versions.id"), nullable=True),  # None: pre-0003
    Column("version", Integer, nullable=False),
    Column("value", Float, nullable=False),
    Column("created_by", String(200), nullable=False),
    Column("created_at", DateTime(), nullable=False),
    Column("note", Text, nullable=True),
    Column("kind", String(16), nullable=False, default="reviewed"),  # reviewed | provisional
    Column("review_band", Float, nullable=False, default=0.0),  # |score - value| < band: decision "review"
    UniqueConstraint("class_name", "model_version_id", "version"),
    Index("ix_thresholds_class_name", "class_name"),
)

reviews = Table(
    "reviews", metadata,
    Column("id", Integer, primary_key=True),
    Column("image_id", Integer, ForeignKey("images.id"), nullable=False),
    Column("verdict", String(16), nullable=False),  # normal | defect | skip | unreviewed (an undo)
    Column("reason", Text, nullable=True),
    Column("reviewer", String(200), nullable=False),
    Column("created_at", DateTime(), nullable=False),
    Column("result_id", Integer, ForeignKey("results.id"), nullable=True),  # what the reviewer was shown
    Index("ix_reviews_image_id", "image_id"),
)

#: delivery of decisions to the line: written in the transaction that stores the result (so a crash between
#: storing and sending loses nothing), sent at least once and in order per (sink, source)
outbox = Table(
    "outbox", metadata,
    Column("id", Integer, primary_key=True),
    Column("result_id", Integer, ForeignKey("results.id"), nullable=False),
    Column("sink", String(100), nullable=False),
    Column("source_id", Integer, ForeignKey("sources.id"), nullable=True),
    Column("payload", Text, nullable=False),  # the event as JSON
    Column("status", String(16), nullable=False),  # pending | sent
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error", Text, nullable=True),
    Column("next_attempt_at", DateTime(), nullable=False),
    Column("created_at", DateTime(), nullable=False),
    Column("sent_at", DateTime(), nullable=True),
    UniqueConstraint("result_id", "sink"),
    Index("ix_outbox_sink_status", "sink", "status"),
)

#: DICOM attributes of an image row (``inspector/dicom.py`` says which tags are read and kept): identifiers of
#: the study, series and instance (not of the patient), what the file is, and the window its frame is scored in
dicom_images = Table(
    "dicom_images", metadata,
    Column("image_id", Integer, ForeignKey("images.id"), primary_key=True, autoincrement=False),
    Column("study_uid", String(64), nullable=True),
    Column("series_uid", String(64), nullable=True),
    Column("sop_uid", String(64), nullable=True),
    Column("sop_class_uid", String(64), nullable=True),
    Column("frames", Integer, nullable=False),  # frames of the file (images.frame is this row's)
    Column("modality", String(16), nullable=True),
    Column("body_part", String(64), nullable=True),
    Column("photometric", String(32), nullable=True),
    Column("transfer_syntax", String(64), nullable=True),
    Column("window", String(100), nullable=True),  # the source's window preset as configured (None: the file's)
    Column("window_source", String(32), nullable=True),  # preset | file | file VOI LUT | frame range | colour...
    Column("window_center", Float, nullable=True),
    Column("window_width", Float, nullable=True),
    Index("ix_dicom_images_sop_uid", "sop_uid"),
    Index("ix_dicom_images_study_uid", "study_uid"),
)
