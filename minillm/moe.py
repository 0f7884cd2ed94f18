"""DeepSeek mixture of experts (DeepSeekMoE, arXiv:2401.06066; V3's router, arXiv:2412.19437).

Every token goes through the shared experts (one fused gated MLP, n_shared_experts wide) and through
num_experts_per_tok of the n_routed_experts routed ones, weighted by the router:

    V2  softmax scores; top-k over all experts ("greedy"), or first the topk_group groups with the
        best single expert, then top-k inside them ("group_limited_greedy"); weights = chosen
        scores x routed_scaling_factor (transformers' V2 never normalises them, whatever
        norm_topk_prob says; DeepSeek's V2 code does when norm_topk_prob is set).
    V3  sigmoid scores ("noaux_tc"): e_score_correction_bias is added for choosing only (groups
        scored by the sum of their two best corrected scores); weights are the uncorrected scores,
        normalised when norm_topk_prob, then x routed_scaling_factor.

The router runs in fp32 (as transformers). The routed experts' weights are stacked, (E, ...), and
computed grouped by expert: the (token, slot) pairs are sorted by expert and each active expert
does one matmul over its tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import Config
from .layers import ACTS, MLP


def expert(w, x: torch.Tensor, e: int) -> torch.Tensor:
    """x @ w[e].T for a stacked (E, N, K) parameter, or its quantized form (quant.QExperts)."""
    return F.linear(x, w[e]) if isinstance(w, torch.Tensor) else w(x, e)


class MoE(nn.Module):
    fp32_params = ("e_score_correction_bias",)   # kept fp32 whatever the model dtype, as transformers

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg, self.act = cfg, ACTS[cfg.act]
        E, C, inter = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        # a plain nn.Linear on purpose: the router runs in fp32 on its fp32 weights (below), never
        # on the CPU plan or quantized, since a flipped top-k choice is a different expert
        self.router = nn.Linear(C, E, bias=False)
        if cfg.topk_method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(torch.zeros(E))
        self.experts_gate_up = nn.Parameter(torch.empty(E, 2 * inter, C))   # each expert [gate; up]
        self.experts_down = nn.Parameter(torch.empty(E, C, inter))
        self.shared = MLP(cfg, inter * cfg.n_shared_experts) if cfg.n_shared_experts else None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, C) -> weights (N, k) fp32, expert ids (N, k)."""
        cfg = self.cfg
        logits = F.linear(x.float(), self.router.weight.float())             # (N, E)
        scores = logits.softmax(-1) if cfg.scoring_func == "softmax" else logits.sigmoid()
        choice = scores + self.e_score_correction_bias if cfg.topk_method == "noaux_tc" else scores
        if cfg.topk_method in ("group_limited_greedy", "noaux_tc"):
            groups = choice.view(len(x), cfg.n_group, -1)                     # (N, G, E/G)
            group_score = (groups.amax(-1) if cfg.topk_method == "group_limited_greedy"
                           else groups.topk(2, dim=-1).values.sum(-1))        # (N, G)
            best = group_score.topk(cfg.topk_group, dim=-1).indices
            keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, best, True)
            choice = groups.masked_fill(~keep[..., None], float("-inf")).flatten(1)
        idx = choice.topk(cfg.num_experts_per_tok, dim=-1).indices           # (N, k)
        w = scores.gather(1, idx)
        if cfg.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return w * cfg.routed_scaling_factor, idx

    def experts(self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x (N, C), w and idx (N, k) -> sum over each token's k experts of w * expert(x), (N, C)."""
        inter = self.cfg.moe_intermediate_size
        flat = idx.flatten()                                  # (N*k,) expert of each (token, slot)
        order = flat.argsort(stable=True)                     # slots grouped by expert
        token = order // idx.shape[1]                         # the token of each sorted slot
        counts = torch.bincount(flat, minlength=self.cfg.n_routed_experts).tolist()
        xs = x[token]                                         # (N*k, C), sorted by expert
        ys = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(counts):                        # one matmul per active expert
            if n:
                gate, up = expert(self.experts_gate_up, xs[start:start + n], e).split(inter, dim=-1)
                ys[start:start + n] = expert(self.experts_down, self.act(gate) * up, e)
                start += n
        # weights applied in fp32, summed in the model dtype (transformers' order of roundings)
        ys = (ys * w.flatten()[order, None]).to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token, ys)

    def forward(self, x):
        B, T, C = x.shape
        h = x.reshape(B * T, C)
        w, idx = self.route(h)
        out = self.experts(h, w, idx).view(B, T, C)
        return out + self.shared(x) if self.shared is not None else out
