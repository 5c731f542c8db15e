"""The weight-free arithmetic of MuSc: LNAMD, MSM, the pixel map and RsCIN (symbols in ``musc/__init__``).

Every function works on whole batches of images and computes the official code's arithmetic
(github.com/xrli-U/MuSc, commit b76b93da8bd3096a99964a96ae29d46f197a0651).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

#: share of the other images whose nearest-patch distances are averaged (the official ``topmin_max``)
FRACTION = 0.3
#: RsCIN neighbour counts as the official code picks them: VisA by name, everything else like MVTec
K_LIST_MVTEC = (1, 2, 3)
K_LIST_VISA = (1, 8, 9)


#: VisA's 12 categories (the official VisA reader's list)
VISA_CLASSES = frozenset({"candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1",
                          "pcb2", "pcb3", "pcb4", "pipe_fryum"})


def official_k_list(dataset: str) -> tuple[int, ...]:
    """The official choice: [1, 8, 9] when the dataset is named "visa", [1, 2, 3] otherwise."""
    return K_LIST_VISA if dataset.lower() == "visa" else K_LIST_MVTEC


def dataset_k_list(class_names: Sequence[str]) -> tuple[int, ...]:
    """The official choice for a dataset known by its classes rather than its name (``inspector eval`` reads
    folders): VisA-style [1, 8, 9] when every class is a VisA category, MVTec-style [1, 2, 3] otherwise."""
    names = {str(c).lower() for c in class_names}
    return official_k_list("visa" if names and names <= VISA_CLASSES else "mvtec")


def lnamd(tokens: torch.Tensor, grid: int, r: int) -> torch.Tensor:
    """Local neighbourhood aggregation, one tap: tokens F_l [N, L, C] (L = G*G, CLS dropped) -> Z [N, L, C].

    LayerNorm over each image's whole (L, C) map (no affine, eps 1e-5), then the r x r mean at stride 1
    with zero padding r // 2 (padded zeros counted), then L2 normalisation over C.
    """
    n, length, width = tokens.shape
    x = F.layer_norm(tokens.float(), (length, width))  # one mean / variance per image
    if r > 1:
        x = x.transpose(1, 2).reshape(n, width, grid, grid)  # [N, C, G, G]
        x = F.avg_pool2d(x, r, stride=1, padding=r // 2, count_include_pad=True)
        x = x.reshape(n, width, length).transpose(1, 2)  # [N, L, C]
    return F.normalize(x, dim=-1)


def nearest_distances(query: torch.Tensor, memory: torch.Tensor, budget_bytes: int = 256 * 2**20) -> torch.Tensor:
    """D[i, p, j] = min_q ||z_ip - z_jq||: query [Nq, L, C], memory [M, L', C] -> [Nq, L, M] (fp32).

    Squared distances by the expansion ||x||^2 + ||y||^2 - 2 x.y on blocks of (query images x memory
    images) whose [bq*L, bm*L'] distance block fits ``budget_bytes``; the minimum over q is taken per
    block, the square root only on the minima, clamped at 1e-30 as ``torch.cdist`` does. The full
    distance tensor is never materialised.
    """
    nq, length, width = query.shape
    m, mem_length, _ = memory.shape
    out = query.new_empty(nq, length, m, dtype=torch.float32)
    if nq == 0 or m == 0:
        return out
    pair = length * mem_length * 4
    per_block = max(1, budget_bytes // pair)
    bm = min(m, per_block)
    bq = min(nq, max(1, per_block // bm))
    q_all = query.float()
    q_norm = q_all.pow(2).sum(-1)  # [Nq, L]
    for j0 in range(0, m, bm):
        mem = memory[j0:j0 + bm].float()  # [bm, L', C] (upcast if the pool is stored in half precision)
        count = mem.shape[0]
        mem_flat = mem.reshape(-1, width)  # [bm*L', C]
        mem_norm = mem_flat.pow(2).sum(-1)  # [bm*L']
        for i0 in range(0, nq, bq):
            q = q_all[i0:i0 + bq]
            d2 = q.reshape(-1, width) @ mem_flat.T  # [bq*L, bm*L']
            d2.mul_(-2).add_(q_norm[i0:i0 + bq].reshape(-1, 1)).add_(mem_norm)
            nearest = d2.view(-1, count, mem_length).amin(-1)  # [bq*L, bm]
            out[i0:i0 + bq, :, j0:j0 + count] = nearest.clamp_min_(1e-30).sqrt_().view(-1, length, count)
    return out


def nearest_distances_cdist(query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """The official arithmetic of the same D (official ``_MSM.py``): one ``torch.cdist`` per query image on contiguous
    [L, C] and [M*L', C] operands, the whole [L, M*L'] distance matrix at once. Memory O(M * L^2)."""
    nq, length, width = query.shape
    m, mem_length, _ = memory.shape
    flat = memory.float().reshape(-1, width).contiguous()
    out = query.new_empty(nq, length, m, dtype=torch.float32)
    for i in range(nq):
        d = torch.cdist(query[i].float().contiguous(), flat)  # [L, M*L']
        out[i] = d.view(length, m, mem_length).amin(-1)
    return out


def top_min_mean(distances: torch.Tensor, excluded: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """distances [Nq, L, M], excluded [Nq, M] (True: not a reference of that query), k [Nq] -> [Nq, L]:
    the mean of the k_i smallest distances over the references of query i (NaN where k_i = 0)."""
    if distances.shape[-1] == 0:
        return distances.new_full(distances.shape[:2], float("nan"))
    d = distances.masked_fill(excluded[:, None, :], float("inf")).sort(dim=-1).values
    total = d.cumsum(-1).gather(-1, (k - 1).clamp_min(0).view(-1, 1, 1).expand(-1, d.shape[1], 1))[..., 0]
    mean = total / k.view(-1, 1).to(total.dtype)
    return torch.where((k > 0).view(-1, 1), mean, mean.new_full((), float("nan")))


def official_k(references: int, fraction: float = FRACTION) -> int:
    """k = int(fraction * m) for m references, as the official code computes it (0 for m <= 3 at 0.3)."""
    return int(fraction * references)


def upsample(grid_map: torch.Tensor, size: int) -> torch.Tensor:
    """[N, G, G] -> [N, S, S]: bilinear with align_corners=True, in the input's dtype (float64)."""
    return F.interpolate(grid_map[:, None], size=(size, size), mode="bilinear", align_corners=True)[:, 0]


def rscin(scores: torch.Tensor, embeddings: torch.Tensor, k_list: Sequence[int]) -> torch.Tensor:
    """RsCIN (official ``_RsCIN.py``): raw scores a [N] and unit image embeddings T [N, E] of one pool -> [N] float32.

    s = min-max(a); W = T T^T; for each k, each image's score is the W-weighted mean of s over its k most
    similar images (itself included); the result is the mean over ``k_list``. Identical raw scores give 0
    (the official code divides by zero and returns NaN).
    """
    n = scores.shape[0]
    if any(int(k) < 1 for k in k_list):
        return scores.float()  # the official "0 in k_list" switch
    if n < max(k_list):
        raise ValueError(f"RsCIN with k_list {list(k_list)} needs at least {max(k_list)} images, got {n}")
    a = scores.double()
    span = a.max() - a.min()
    s = ((a - a.min()) / span if span > 0 else torch.zeros_like(a)).float()
    w = embeddings.float() @ embeddings.float().T  # [N, N]
    out = []
    for k in k_list:
        top = w.topk(int(k), dim=1)  # [N, k] the k largest similarities per row
        kept = torch.zeros_like(w).scatter_(1, top.indices, top.values)
        out.append((kept @ s) / kept.sum(1))
    return torch.stack(out).mean(0)
