"""MuSc (Li et al., ICLR 2024, "Zero-Shot Industrial Anomaly Classification and Segmentation with Mutual
Scoring of the Unlabeled Images", arXiv 2401.16753): training-free and text-free zero-shot scoring of a
*pool* of unlabeled images of one class, each against all the others.

The function computed is the one of the official code, github.com/xrli-U/MuSc at commit
b76b93da8bd3096a99964a96ae29d46f197a0651 (github.com/xrli-U/MuSc); the way it is computed is our own (nearest
distances as chunked matrix products under a memory budget, no [L, (N-1)L] matrix).

Symbols (the paper's, mapped once):

* N images in the pool, S input side, G = S / patch grid side, L = G*G patches, C vision width, E joint
  embedding width; T = 4 taps l in (6, 12, 18, 24) (1-indexed blocks); R = (1, 3, 5) LNAMD degrees r
* F_l [N, L, C]: the raw residual stream after block l, CLS dropped, no ln_post, no projection
* LNAMD: Z_{r,l} = normalize(avgpool_r(LayerNorm_{(L, C)}(F_l))) [N, L, C], the LayerNorm over each image's
  whole map (no affine), the r x r mean at stride 1 with zero padding r // 2 counting the padded zeros,
  L2 normalisation over C
* MSM: for image i, patch p and every *other* image j, d_j(p) = min_q ||z_ip - z_jq||; the patch score is
  the mean of the k = int(0.3 (N - 1)) smallest d_j(p) (the image itself excluded by position)
* map: mean over the T taps, then over r (float64), [N, G, G]; bilinear with align_corners=True to S x S
  (no smoothing); a_i = max of the S x S map (the raw image score)
* RsCIN: s = min-max(a) over the pool; W = T T^T of the unit image embeddings g = normalize(ln_post(CLS)
  @ proj); per k in k_list, S^(k)_i = sum_{j in top-k(W_i)} W_ij s_j / sum_{j in top-k(W_i)} W_ij (itself
  included); the official image score is the mean over k. k_list = [1, 2, 3] (MVTec, anything else) or
  [1, 8, 9] (VisA), as the official code picks it by dataset name (``official_k_list``)

The backbone is the shared one with the position embedding resized bicubic **without** antialias, as the
official loader ends up doing (``[musc] pos_embed_antialias = false``; ``true`` shares the kernel of the
other detectors, 0.005 away on a tiny map).

**Two ways to use a pool.**

* ``score_pool(images)``: a closed pool (a lot, a shift, a test split), the paper's setting exactly: maps,
  raw scores a_i and RsCIN scores; nothing is remembered.
* ``predict_tensors`` / ``predict`` (the watcher's path, ``[model] detector = "musc"``): each image is
  scored against the *other* images of its class in the same batch plus the class's pool, which holds the
  class's reference images (``inspector references add``, the folder WinCLIP uses; never replaced) and the
  ``[musc] pool_size`` most recent earlier images (a ring buffer in memory); afterwards the batch joins the
  pool (``[musc] join_pool``). An image's score is decided once, when it is scored: earlier images are
  never rescored. An image with m references uses k = max(1, int(0.3 m)) (the official k is 0, a NaN
  map, below m = 4); an image with no reference at all (the first one of a class) gets the map 2 (the
  largest distance) and image score 1, so it is flagged for review, and ``provenance["unscored"]`` counts
  it. Duplicates (the same preprocessed pixels) are never each other's references and join the pool once
  (the official code keeps them, which halves a twin's score). Reviews (``on_reviews``, from
  ``store.pool_reviews``): a rejected image leaves the pool; an accepted one is preferred (a full pool
  replaces its oldest *unaccepted* image first) and admitted again if it had left. ``pool_remove`` /
  ``pool_add`` take images out / add known-good ones by hand, without scoring.
* Restart: with a ``pool_dir`` (``[musc] pool_dir``, one folder per model version) the rolling pools (and
  the verdicts taken into account) are written after each batch and read back on a class's first use
  (``persist.py``), so a restarted worker rescores and re-reads nothing; ``.to(device)`` moves the pools. Drift: ``_drift_update`` pauses joining while a class's recent images mostly score
  above its early baseline (a run of one defect is not learned as normal); ``provenance["pool_drift"]``.
* ``score_closed_pool`` / ``eval_session``: ``inspector eval``'s batch mode (each class's test split one
  pool, RsCIN with the k list the official code picks) and its live mode from empty in-memory pools.
* ``[musc] approx = "subsample"``: each reference image keeps ``patch_budget`` patches (seeded by its
  content hash) for the nearest-patch search; ``bench_report()["approx_agreement"]`` compares it with the
  exact search.
* Memory: R*T*L*C values per pooled image in ``[musc] pool_dtype`` (``bytes_per_pooled_image``; 67 MB fp32 /
  34 MB fp16 at full size). MSM works in blocks of at most ``[musc] memory_mb`` of distances.
  ``[musc] msm = "cdist"`` runs the official ``torch.cdist`` arithmetic on the full matrix instead.

``anomaly_map`` is the official map (in [0, 2]); ``probability_map`` = map / 2 (exact and monotone, but
real values cluster well below 1); ``image_score`` = a_i / 2; ``text_score`` is the image score (MuSc has
no text, and ``provenance`` says so).
"""

from .model import MuSc, PoolScores, content_hash
from .ops import K_LIST_MVTEC, K_LIST_VISA, dataset_k_list, lnamd, nearest_distances, official_k_list, rscin

__all__ = ["K_LIST_MVTEC", "K_LIST_VISA", "MuSc", "PoolScores", "content_hash", "dataset_k_list", "lnamd",
           "nearest_distances", "official_k_list", "rscin"]
