"""A deliberately naive WinCLIP, written from the facts of anomalib's ``WinClipModel`` (anomalib 2.x, ``anomalib/models/image/winclip``), to check
``inspector.detectors.winclip`` against: open_clip's own modules (``clip.encode_text``, the hooked
``clip.visual`` forward, ``clip.visual.transformer``), one transformer call per window and image, one
Python step per patch in the harmonic aggregation, and explicit loops for the nearest reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from inspector.detectors.winclip import prompt_ensemble


def text_embeddings(clip, class_name: str) -> torch.Tensor:
    import open_clip

    normal, anomalous = prompt_ensemble(class_name)
    t_n = clip.encode_text(open_clip.tokenize(normal)).mean(0)
    t_a = clip.encode_text(open_clip.tokenize(anomalous)).mean(0)
    return torch.stack([t_n, t_a])


def windows_of(grid: int, scale: int) -> list[list[int]]:
    """Each stride-1 window's patch indices, row-major windows, row-major patches."""
    out = []
    for r in range(grid - scale + 1):
        for c in range(grid - scale + 1):
            out.append([(r + i) * grid + (c + j) for i in range(scale) for j in range(scale)])
    return out


def encode(clip, pixels: torch.Tensor, scales=(2, 3)):
    """-> (image embedding [N, D], [window embeddings [N, M_s, D]], patch tokens [N, G*G, W])."""
    visual = clip.visual
    captured = {}
    handle = visual.patch_dropout.register_forward_hook(lambda m, i, o: captured.__setitem__("tokens", i[0]))
    keep = visual.output_tokens
    visual.output_tokens = True
    try:
        image, patches = visual(pixels)
    finally:
        visual.output_tokens = keep
        handle.remove()
    tokens = captured["tokens"]  # [N, 1 + G*G, W]: after the position embedding, before ln_pre
    grid = round((tokens.shape[1] - 1) ** 0.5)
    windows = []
    for scale in scales:
        per_image = []
        for n in range(tokens.shape[0]):
            rows = []
            for patch_ids in windows_of(grid, scale):
                seq = tokens[n, [0] + [p + 1 for p in patch_ids]][None]  # [1, 1 + s*s, W]
                x = visual.transformer(visual.ln_pre(visual.patch_dropout(seq)))  # open_clip 3: batch first
                rows.append(visual.ln_post(x)[0, 0] @ visual.proj)
            per_image.append(torch.stack(rows))
        windows.append(torch.stack(per_image))
    return image, windows, patches


def class_score(embedding: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    cos = F.normalize(embedding, dim=-1) @ F.normalize(text, dim=-1).T
    return (cos / 0.07).softmax(dim=-1)[..., 1]


def harmonic(window_scores: torch.Tensor, grid: int, scale: int) -> torch.Tensor:
    """[N, M_s] -> [N, G, G], one patch at a time."""
    wins = windows_of(grid, scale)
    out = torch.zeros(window_scores.shape[0], grid * grid)
    for p in range(grid * grid):
        covering = [m for m, w in enumerate(wins) if p in w]
        inv = sum(1 / window_scores[:, m] for m in covering)
        out[:, p] = len(covering) / inv
    return out.view(-1, grid, grid)


def assoc(features: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """[N, P, C] vs memory [R, C] -> min over the memory of (1 - cos) / 2, [N, P]."""
    f = F.normalize(features, dim=-1)
    m = F.normalize(memory, dim=-1)
    out = torch.full(f.shape[:2], float("inf"))
    for r in range(m.shape[0]):
        out = torch.minimum(out, (1 - f @ m[r]) / 2)
    return out


@torch.no_grad()
def winclip(clip, pixels: torch.Tensor, class_name: str, reference_pixels: torch.Tensor | None = None,
            scales=(2, 3)) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (image scores [N], anomaly maps [N, S, S]), anomalib's formulas."""
    text = text_embeddings(clip, class_name)
    image, windows, patches = encode(clip, pixels, scales)
    grid = round(patches.shape[1] ** 0.5)
    score = class_score(image, text)
    maps = [score[:, None, None].repeat(1, grid, grid)]
    for scale, w in zip(scales, windows):
        maps.append(harmonic(class_score(w, text), grid, scale))
    grid_map = len(maps) / sum(1 / m for m in maps)
    if reference_pixels is not None:
        _, ref_windows, ref_patches = encode(clip, reference_pixels, scales)
        few = [assoc(patches, ref_patches.reshape(-1, ref_patches.shape[-1])).view(-1, grid, grid)]
        for scale, w, r in zip(scales, windows, ref_windows):
            few.append(harmonic(assoc(w, r.reshape(-1, r.shape[-1])), grid, scale))
        few_map = sum(few) / len(few)
        grid_map = (grid_map + few_map) / 2
        score = (score + few_map.amax(dim=(-2, -1))) / 2
    size = pixels.shape[-2:]
    return score, F.interpolate(grid_map[:, None], size=size, mode="bilinear")[:, 0]
