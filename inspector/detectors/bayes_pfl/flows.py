"""Prompt flows: a Gaussian base distribution pushed through K planar steps.

Paper symbols -> names here (E = text width = joint embedding width, K = flow steps, R = samples):

* q_0(z | x) = N(mu(x), diag(sigma^2(x))), the "simple" distribution  -> ``GaussianBase``
  The official parameterisation is kept exactly: sigma^2 = exp(f_h(x) / 2), i.e. sigma = exp(f_h / 4),
  with f_mu and f_h 3-layer MLPs with Softplus hidden activations.
* planar step z' = z + u * tanh(w^T z + b), log|det J| = log(|1 + psi^T u| + 1e-5),
  psi = (1 - tanh^2(w^T z + b)) w                                 -> ``planar_flow``
* image-specific distribution (ISD): base and (u, w, b) amortised from the image embedding g
                                                                   -> ``ImageSpecificFlow``
* image-agnostic distributions (IAD), one per state s in {normal, abnormal}: a learned input x_f^s,
  a base network shared by both states, free (u, w, b)             -> ``ImageAgnosticFlow``

Noise ``eps`` is always an argument: callers own the random numbers, so a result can be reproduced.
"""

from __future__ import annotations

import torch
from torch import nn


def mlp(width_in: int, hidden: int, width_out: int) -> nn.Sequential:
    """Linear -> Softplus -> Linear -> Softplus -> Linear (indices 0, 2, 4 hold weights)."""
    return nn.Sequential(
        nn.Linear(width_in, hidden), nn.Softplus(), nn.Linear(hidden, hidden), nn.Softplus(),
        nn.Linear(hidden, width_out),
    )


class GaussianBase(nn.Module):
    """x: [..., E] -> (mu: [..., E], var: [..., E]) with var = exp(f_h(x) / 2)."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.mean_net = mlp(width, hidden, width)
        self.log_var_net = mlp(width, hidden, width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean_net(x), torch.exp(0.5 * self.log_var_net(x))


def planar_flow(
    z: torch.Tensor, u: torch.Tensor, w: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply K planar steps.

    z: [..., E]; u, w: [..., K, E]; b: [..., K] (broadcast against z's leading dims).
    Returns (z_K: [..., E], sum_k log|det J_k|: [...]).
    """
    log_det = torch.zeros(z.shape[:-1], dtype=z.dtype, device=z.device)
    for k in range(u.shape[-2]):
        u_k, w_k, b_k = u[..., k, :], w[..., k, :], b[..., k]
        h = torch.tanh((w_k * z).sum(-1) + b_k)  # [...]
        psi_u = (1 - h**2) * (w_k * u_k).sum(-1)
        log_det = log_det + torch.log(torch.abs(1 + psi_u) + 1e-5)
        z = z + u_k * h.unsqueeze(-1)
    return z, log_det


class ImageSpecificFlow(nn.Module):
    """ISD: base and flow parameters amortised from the global image embedding g."""

    def __init__(self, width: int, hidden: int, steps: int):
        super().__init__()
        self.width, self.steps = width, steps
        self.base = GaussianBase(width, hidden)
        self.amor_u = nn.Linear(width, steps * width)  # output index k * E + i -> step k, dim i
        self.amor_w = nn.Linear(width, steps * width)
        self.amor_b = nn.Linear(width, steps)

    def forward(self, g: torch.Tensor, eps: torch.Tensor) -> dict[str, torch.Tensor]:
        """g: [N, E]; eps: [N, R, E] standard normal -> z_K [N, R, E] (+ what the KL term needs)."""
        n = g.shape[0]
        mu, var = self.base(g)  # [N, E] each
        u = self.amor_u(g).view(n, 1, self.steps, self.width)
        w = self.amor_w(g).view(n, 1, self.steps, self.width)
        b = self.amor_b(g).view(n, 1, self.steps)
        z0 = mu.unsqueeze(1) + var.sqrt().unsqueeze(1) * eps  # [N, R, E]
        zk, log_det = planar_flow(z0, u, w, b)
        return {"z0": z0, "zk": zk, "mu": mu, "var": var, "log_det": log_det}


class ImageAgnosticFlow(nn.Module):
    """IAD of one state: learned input x_f, free flow parameters; the base network is shared."""

    def __init__(self, width: int, steps: int):
        super().__init__()
        self.state = nn.Parameter(torch.randn(width))  # x_f^s, N(0, 1) init as in the official code
        self.u = nn.Parameter(torch.randn(steps, width))
        self.w = nn.Parameter(torch.randn(steps, width))
        self.b = nn.Parameter(torch.randn(steps))

    def forward(self, base: GaussianBase, eps: torch.Tensor) -> dict[str, torch.Tensor]:
        """eps: [R, E] -> z_K [R, E]."""
        mu, var = base(self.state)  # [E] each
        z0 = mu + var.sqrt() * eps
        zk, log_det = planar_flow(z0, self.u, self.w, self.b)
        return {"z0": z0, "zk": zk, "mu": mu, "var": var, "log_det": log_det}
