"""Residual cross-modal attention (RCA) and the stage-2 global feature head.

RCA refines each text embedding against one image's patches, independently of the other text
embeddings (no attention between queries), once per feature level l:

    F'_l = normalize(F_l W_l)                         W_l: [W -> E], no bias, one per level
    Q    = T W_q + b_q                                shared by all levels (a 1x1 conv in the official code)
    A_h  = softmax_patches(Q_h K_h^T / sqrt(E))       4 heads; keys = values = F'_l; scale uses the full E
    T'_l = normalize(T + concat_h(A_h V_h))

Shapes: T [N, M, E] (M text embeddings per image), F_l [N, P, W] (P patches).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResidualCrossModalAttention(nn.Module):
    def __init__(self, text_width: int, vision_width: int, levels: int, heads: int = 4):
        super().__init__()
        if text_width % heads:
            raise ValueError(f"text width {text_width} is not divisible by {heads} RCA heads")
        self.width, self.heads = text_width, heads
        self.q_proj = nn.Linear(text_width, text_width)
        self.patch_proj = nn.ModuleList(nn.Linear(vision_width, text_width, bias=False) for _ in range(levels))

    def project_patches(self, level: int, patch_tokens: torch.Tensor) -> torch.Tensor:
        """F_l: [N, P, W] -> F'_l: [N, P, E], L2-normalised."""
        return F.normalize(self.patch_proj[level](patch_tokens), dim=-1)

    def forward(self, text: torch.Tensor, query: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """text T: [N, M, E]; query Q = q_proj(T): [N, M, E]; patches F'_l: [N, P, E] -> T'_l [N, M, E]."""
        n, m, e = query.shape
        d = e // self.heads
        q = query.view(n, m, self.heads, d).transpose(1, 2)  # [N, h, M, d]
        kv = patches.view(n, patches.shape[1], self.heads, d).transpose(1, 2)  # [N, h, P, d]
        attended = F.scaled_dot_product_attention(q, kv, kv, scale=e**-0.5)  # [N, h, M, d]
        return F.normalize(text + attended.transpose(1, 2).reshape(n, m, e), dim=-1)


class GlobalFeatureFuse(nn.Module):
    """Stage-2 image head: attention pooling of the concatenated patch tokens of all levels.

    X = [F_1 | ... | F_L]: [N, P, L*W]; Y = X A: [N, P, W/2]; alpha = softmax_P(Y c); out = (sum_p alpha_p Y_p) B.
    """

    def __init__(self, vision_width: int, text_width: int, levels: int):
        super().__init__()
        hidden = vision_width // 2
        self.proj_in = nn.Linear(vision_width * levels, hidden)
        self.score = nn.Linear(hidden, 1)
        self.proj_out = nn.Linear(hidden, text_width)

    def forward(self, patch_tokens: list[torch.Tensor]) -> torch.Tensor:
        y = self.proj_in(torch.cat(patch_tokens, dim=-1))  # [N, P, W/2]
        alpha = torch.softmax(self.score(y), dim=1)  # [N, P, 1]
        return self.proj_out((alpha * y).sum(dim=1))  # [N, E]
