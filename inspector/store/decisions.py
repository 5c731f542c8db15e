"""Decisions at write time: pass, fail or review, stored with the result, by the threshold in force.

When a live (or `inspector score`) result is stored, it is decided in the same transaction:

* the threshold in force for its (class, model version) is the newest threshold row of that pair: one a
  reviewer saved (``reviewed``) or, before any, a **provisional** one computed once from the unlabeled
  scores of the pair's first ``provisional_after`` results (rule below); until that many exist, every
  image is ``review``;
* ``score >= threshold`` is ``fail``, below is ``pass``; within ``review_band`` of the threshold it is
  ``review`` (an uncertainty band, stored with the threshold row);
* a ``pass`` is drawn into the audit sample with probability ``audit_share``, by a seeded hash of the
  image (random, reproducible, recorded; never chosen by score): audited passes go to the review queue and
  measure the escape rate (``stats.py``).

A later threshold never rewrites a stored decision: ``results.threshold_id`` says which row decided.
Shadow and backfill results decide nothing (their decision stays None).

The provisional rule: ``median + k * 1.4826 * MAD`` of the first N scores (``provisional_rule = "mad"``,
k = ``provisional_k``: robust to a few defects among them; k = 3.5 flags about 0.02 % of a normal class's
images if its scores were Gaussian), or the ``1 - expected_flag_rate`` quantile (``provisional_rule =
"rate"``: the share of images a line expects to reject). Both are clipped to [0, 1].
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from ..config import DecisionSettings
from .db import utcnow
from .schema import images, jobs, results, thresholds

PASS, FAIL, REVIEW = "pass", "fail", "review"
PROVISIONAL, REVIEWED = "provisional", "reviewed"


@dataclass
class DecisionPolicy(DecisionSettings):
    """How results are decided (the ``[decisions]`` settings) and where their events go (the enabled
    ``[outputs]`` sinks)."""

    sinks: tuple[str, ...] = field(default_factory=tuple)


def provisional_value(scores: np.ndarray, policy: DecisionPolicy) -> float:
    """The provisional threshold of a class's first scores (see the module docstring)."""
    if policy.provisional_rule == "rate":
        value = float(np.quantile(scores, 1.0 - policy.expected_flag_rate))
    else:
        median = float(np.median(scores))
        mad = float(np.median(np.abs(scores - median)))
        value = median + policy.provisional_k * 1.4826 * mad
    return min(1.0, max(0.0, value))


def audited(image_id: int, sha256: str | None, policy: DecisionPolicy) -> bool:
    """Whether a pass joins the audit sample: a seeded uniform draw per image content."""
    if policy.audit_share <= 0:
        return False
    key = f"{policy.audit_seed}:{sha256 or image_id}".encode()
    draw = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") / 2**64
    return draw < policy.audit_share


def threshold_in_force(conn: Any, class_name: str, version_id: int) -> Any | None:
    return conn.execute(select(thresholds).where(thresholds.c.class_name == class_name,
                                                 thresholds.c.model_version_id == version_id)
                        .order_by(thresholds.c.version.desc()).limit(1)).first()


def _provisional(conn: Any, class_name: str, version_id: int, policy: DecisionPolicy) -> Any | None:
    """Compute and store the provisional threshold once the pair has enough results; None before."""
    deciding = (select(results.c.image_score).join(images, images.c.id == results.c.image_id)
                .join(jobs, (jobs.c.image_id == results.c.image_id)
                      & (jobs.c.model_version_id == results.c.model_version_id))
                .where(images.c.class_name == class_name, results.c.model_version_id == version_id,
                       jobs.c.purpose.in_(("live", "manual"))))
    scores = np.array(conn.execute(deciding.order_by(results.c.id).limit(policy.provisional_after))
                      .scalars().all(), dtype=np.float64)
    if scores.size < policy.provisional_after:
        return None
    value = provisional_value(scores, policy)
    rule = (f"median + {policy.provisional_k:g}·1.4826·MAD" if policy.provisional_rule != "rate"
            else f"{100 * (1 - policy.expected_flag_rate):g} % quantile")
    try:
        with conn.begin_nested():  # another worker may store the same provisional row at this moment
            conn.execute(thresholds.insert().values(
                class_name=class_name, model_version_id=version_id, version=1, value=value,
                created_by="inspector", created_at=utcnow(), kind=PROVISIONAL, review_band=policy.review_band,
                note=f"provisional: {rule} of the first {scores.size} unlabeled scores"))
    except IntegrityError:
        pass
    return threshold_in_force(conn, class_name, version_id)


def decide(conn: Any, image_id: int, sha256: str | None, class_name: str, version_id: int, score: float,
           policy: DecisionPolicy) -> dict[str, Any]:
    """``decision``, ``threshold_id`` and ``audit`` for a result about to be stored (in its transaction)."""
    th = threshold_in_force(conn, class_name, version_id) or _provisional(conn, class_name, version_id, policy)
    if th is None:
        return {"decision": REVIEW, "threshold_id": None, "audit": False}
    if abs(score - th.value) < (th.review_band or 0.0):
        decision = REVIEW
    else:
        decision = FAIL if score >= th.value else PASS
    return {"decision": decision, "threshold_id": th.id,
            "audit": decision == PASS and audited(image_id, sha256, policy)}
