"""A deliberately naive MuSc, written from the formulas of spec ``musc.md`` §3-8 (the official code of
github.com/xrli-U/MuSc at b76b93d) to check ``inspector.detectors.musc`` against. Nothing is shared with
the implementation: open_clip's own modules run one image at a time, the position embedding is resized
here, LNAMD sums shifted copies of the grid, nearest distances come from the direct formula one image
pair at a time, the bilinear upsampling is an explicit weight matrix, RsCIN loops over images.

``mistake`` switches in a deliberate error, so the tests can show that the tolerance catches it:
``"antialias"`` (antialiased position-embedding resize), ``"k+1"`` (one more neighbour image in MSM),
``"self"`` (the image is one of its own references), ``"token_ln"`` (LayerNorm per patch, not per map),
``"corners"`` (align_corners=False), ``"grid_max"`` (image score = max of the G x G map).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LAYERS = (6, 12, 18, 24)
R_LIST = (1, 3, 5)


def resize_position_embedding(pos: torch.Tensor, grid: int, antialias: bool) -> torch.Tensor:
    old = round(math.sqrt(pos.shape[0] - 1))
    if old == grid:
        return pos
    img = pos[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=(grid, grid), mode="bicubic", align_corners=False, antialias=antialias)
    return torch.cat([pos[:1], img.permute(0, 2, 3, 1).reshape(grid * grid, -1)])


@torch.no_grad()
def forward(clip, pixels: torch.Tensor, mistake: str = "") -> tuple[list[list[torch.Tensor]], torch.Tensor]:
    """-> (taps[n][t]: [L, C] after block LAYERS[t], CLS dropped; unit image embeddings [N, E])."""
    visual = clip.visual
    patch = visual.conv1.kernel_size[0]
    grid = pixels.shape[-1] // patch
    pos = resize_position_embedding(visual.positional_embedding.detach(), grid, antialias=mistake == "antialias")
    taps, embeddings = [], []
    for n in range(pixels.shape[0]):
        x = visual.conv1(pixels[n:n + 1])  # [1, C, G, G]
        x = x.reshape(1, x.shape[1], -1).permute(0, 2, 1)  # [1, L, C], patch p = row * G + col
        x = torch.cat([visual.class_embedding.view(1, 1, -1), x], dim=1) + pos
        x = visual.ln_pre(x)
        mine = []
        for index, block in enumerate(visual.transformer.resblocks, start=1):
            x = block(x)  # open_clip's own block (batch first)
            if index in LAYERS:
                mine.append(x[0, 1:].clone())
        taps.append(mine)
        g = visual.ln_post(x[0, 0]) @ visual.proj
        embeddings.append(g / g.norm())
    return taps, torch.stack(embeddings)


def lnamd(tap: torch.Tensor, grid: int, r: int, mistake: str = "") -> torch.Tensor:
    """[L, C] -> [L, C]: LayerNorm over all L*C values, the sum of the valid r x r neighbours (zero padding;
    the divisor disappears in the normalisation), unit rows."""
    if mistake == "token_ln":
        mu = tap.mean(-1, keepdim=True)
        var = ((tap - mu) ** 2).mean(-1, keepdim=True)
    else:
        mu = tap.mean()
        var = ((tap - mu) ** 2).mean()
    x = ((tap - mu) / torch.sqrt(var + 1e-5)).reshape(grid, grid, -1)
    out = torch.zeros_like(x)
    h = r // 2
    for di in range(-h, h + 1):
        for dj in range(-h, h + 1):
            # out[i, j] += x[i + di, j + dj] wherever that neighbour exists
            rows = slice(max(0, -di), grid - max(0, di))
            cols = slice(max(0, -dj), grid - max(0, dj))
            src_rows = slice(max(0, di), grid - max(0, -di))
            src_cols = slice(max(0, dj), grid - max(0, -dj))
            out[rows, cols] += x[src_rows, src_cols]
    out = out.reshape(grid * grid, -1)
    return out / out.norm(dim=-1, keepdim=True)


def features(taps: list[list[torch.Tensor]], grid: int, mistake: str = "") -> list[dict]:
    """Per image, {(r, t): Z [L, C]}."""
    return [{(r, t): lnamd(image[t], grid, r, mistake) for r in R_LIST for t in range(len(LAYERS))}
            for image in taps]


def nearest(za: torch.Tensor, zb: torch.Tensor) -> torch.Tensor:
    """For each patch of a [L, C], the distance to its nearest patch of b [L', C] (direct formula)."""
    return ((za[:, None, :] - zb[None, :, :]) ** 2).sum(-1).sqrt().min(dim=1).values


def patch_scores(query: dict, refs: list[dict], k: int) -> torch.Tensor:
    """Mean over (r, tap) of: for each patch, the mean of the k smallest nearest distances to the refs."""
    maps = []
    for key, z in query.items():
        d = torch.stack([nearest(z, ref[key]) for ref in refs], dim=1)  # [L, M]
        maps.append(d.sort(dim=1).values[:, :k].mean(1).double())
    return torch.stack(maps).mean(0)


def bilinear_matrix(grid: int, size: int, align_corners: bool = True) -> torch.Tensor:
    """A [S, G] float64 with map_S = A @ map_G @ A^T (bilinear upsampling along one axis)."""
    a = torch.zeros(size, grid, dtype=torch.float64)
    for o in range(size):
        if align_corners:
            x = o * (grid - 1) / (size - 1)
        else:
            x = max((o + 0.5) * grid / size - 0.5, 0.0)
        i0 = min(math.floor(x), grid - 1)
        i1 = min(i0 + 1, grid - 1)
        w = x - i0
        a[o, i0] += 1 - w
        a[o, i1] += w
    return a


def upsample(grid_map: torch.Tensor, size: int, mistake: str = "") -> torch.Tensor:
    grid = grid_map.shape[-1]
    a = bilinear_matrix(grid, size, align_corners=mistake != "corners")
    return a @ grid_map @ a.T


def rscin(raw: torch.Tensor, embeddings: torch.Tensor, k_list) -> torch.Tensor:
    n = raw.shape[0]
    s = [(float(v) - float(raw.min())) / (float(raw.max()) - float(raw.min())) for v in raw]
    w = embeddings.double() @ embeddings.double().T
    out = torch.zeros(n, dtype=torch.float64)
    for i in range(n):
        order = sorted(range(n), key=lambda j: -float(w[i, j]))
        for k in k_list:
            top = order[:k]
            out[i] += sum(float(w[i, j]) * s[j] for j in top) / sum(float(w[i, j]) for j in top) / len(k_list)
    return out


def score_pool(feats: list[dict], embeddings: torch.Tensor, size: int, k_list=(1, 2, 3), mistake: str = ""):
    """A closed pool -> (maps [N, S, S] float64, raw scores [N], RsCIN scores [N])."""
    n = len(feats)
    k = int(0.3 * (n - 1)) + (1 if mistake == "k+1" else 0)
    grid = round(math.sqrt(next(iter(feats[0].values())).shape[0]))
    maps, raw = [], []
    for i in range(n):
        refs = [feats[j] for j in range(n) if j != i or mistake == "self"]
        grid_map = patch_scores(feats[i], refs, k).view(grid, grid)
        full = upsample(grid_map, size, mistake)
        maps.append(full)
        raw.append(grid_map.max() if mistake == "grid_max" else full.max())
    raw = torch.stack(raw)
    return torch.stack(maps), raw, rscin(raw, embeddings, k_list)


def score_live(query: dict, refs: list[dict], size: int) -> torch.Tensor:
    """One image against a list of references (live mode): k = max(1, int(0.3 m)) -> [S, S] float64."""
    grid = round(math.sqrt(next(iter(query.values())).shape[0]))
    k = max(1, int(0.3 * len(refs)))
    return upsample(patch_scores(query, refs, k).view(grid, grid), size)
