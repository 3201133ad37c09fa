"""A fast CPU implementation of the zoo's MoE experts for training, registered with transformers.

The zoo's families (Mixtral, Qwen3-MoE, OLMoE) keep their experts as two stacked tensors,
``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I), and compute for each token t and each
of its top-k experts e with routing weight w_{t,e}::

    y_t = Σ_e w_{t,e} · W_down[e] (silu(W_gate[e] x_t) ⊙ W_up[e] x_t)

transformers dispatches that computation through ``config._experts_implementation``
(``"eager"`` loops over experts with a one-hot mask per expert, ``"grouped_mm"`` sorts the
token-expert pairs and calls a grouped matrix product). :func:`sorted_experts_forward` does the
same as ``grouped_mm`` with a hand-written backward (:class:`SortedExperts`): the pairs are sorted
by expert once (a stable sort, so the order is a function of the routing alone), each expert's
rows are one contiguous block for two plain matrix products, and the backward writes each
expert's weight gradient straight into its slice of one (E, ·, ·) gradient instead of building
the autograd graph of a dozen small operations per expert. At the zoo's shapes (hidden 96,
expert ffn 128, 8 experts, a batch of ~1300 tokens) the experts are about half of a training step,
and most of their time in the generic implementations is small operations around the products.

Only the computation changes: the parameters, their names and the checkpoint are the family's
own. The implementation is chosen for training only (:func:`training_experts`); a saved config
never names it, and a model loaded with ``AutoModelForCausalLM`` computes the same logits.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

#: The name the implementation is registered under in transformers' ``ExpertsInterface``.
SORTED = "moelens_sorted"
#: Implementations ``train`` accepts: the fast one, and the two of transformers it is checked against.
EXPERTS_IMPLEMENTATIONS = (SORTED, "grouped_mm", "eager")


def _silu_and_grad(gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """silu(g) = g·σ(g) and its derivative σ(g)·(1 + g·(1 − σ(g)))."""
    sig = torch.sigmoid(gate)
    act = gate * sig
    # d silu / dg = σ + g σ (1 − σ) = σ + act − act·σ
    grad = sig + act - act * sig
    return act, grad


def _blocks(counts: list[int]) -> Iterator[tuple[int, slice]]:
    """Each expert that has pairs, with its contiguous block of the rows sorted by expert."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, slice(start, start + n)
        start += n


def _grouped_mm(x: torch.Tensor, weight: torch.Tensor, counts: list[int], out: torch.Tensor) -> None:
    """out[rows_e] = x[rows_e] · W[e]ᵀ for each expert e's block of rows (``weight`` (E, O, I))."""
    for e, rows in _blocks(counts):
        torch.mm(x[rows], weight[e].t(), out=out[rows])


def _grouped_mm_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, counts: list[int],
                         grad_weight: torch.Tensor, grad_x: torch.Tensor) -> None:
    """The backward of :func:`_grouped_mm` from the gradient g of its output, written into
    ``grad_weight`` and ``grad_x``: ∂W[e] = g[rows_e]ᵀ · x[rows_e] and ∂x[rows_e] = g[rows_e] · W[e]."""
    for e, rows in _blocks(counts):
        torch.mm(grad[rows].t(), x[rows], out=grad_weight[e])
        torch.mm(grad[rows], weight[e], out=grad_x[rows])


class SortedExperts(torch.autograd.Function):
    """y = Σ_k w_k · down[e_k](silu(gate[e_k] x) ⊙ up[e_k] x) over token-expert pairs sorted by expert.

    Inputs: ``x`` (T, H); ``order`` (S,) the pairs (flat index t·k + j) sorted by expert;
    ``counts`` the number of pairs per expert (a list, summing to S = T·k); ``weights`` (T, k)
    the routing weights; ``gate_up`` (E, 2I, H); ``down`` (E, H, I). Output (T, H)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, order: torch.Tensor, counts: list[int], weights: torch.Tensor,
                gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        n_tokens, k = weights.shape
        inter = down.shape[-1]
        token = order // k
        xs = x.index_select(0, token)  # (S, H), rows grouped by expert
        h = x.new_empty(xs.shape[0], 2 * inter)
        y = x.new_empty(xs.shape[0], x.shape[1])
        _grouped_mm(xs, gate_up, counts, out=h)
        act, dact = _silu_and_grad(h[:, :inter])
        up = h[:, inter:]
        a = act * up  # (S, I)
        _grouped_mm(a, down, counts, out=y)
        w = weights.reshape(-1).index_select(0, order)  # (S,)
        # back to (token, k) order, then the sum over k (as transformers' grouped_mm does)
        out = x.new_empty(n_tokens * k, x.shape[1])
        out.index_copy_(0, order, y * w[:, None])
        ctx.save_for_backward(xs, order, w, act, dact, up, a, y, gate_up, down)
        ctx.counts, ctx.k, ctx.n_tokens = counts, k, n_tokens
        return out.view(n_tokens, k, -1).sum(dim=1)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        xs, order, w, act, dact, up, a, y, gate_up, down = ctx.saved_tensors
        counts, k, n_tokens = ctx.counts, ctx.k, ctx.n_tokens
        token = order // k
        gy = grad_out.index_select(0, token)  # (S, H): d out / d (w·y) is the token's gradient
        grad_w = (gy * y).sum(dim=1)  # (S,)
        gy.mul_(w[:, None])  # d / d y
        grad_down = torch.zeros_like(down)
        grad_gate_up = torch.zeros_like(gate_up)
        ga = torch.empty_like(a)
        _grouped_mm_backward(gy, a, down, counts, grad_down, ga)
        inter = a.shape[1]
        gh = a.new_empty(a.shape[0], 2 * inter)
        torch.mul(ga, up, out=gh[:, :inter]).mul_(dact)  # d / d gate
        torch.mul(ga, act, out=gh[:, inter:])  # d / d up
        gxs = torch.empty_like(xs)
        _grouped_mm_backward(gh, xs, gate_up, counts, grad_gate_up, gxs)
        # each token's k rows summed in k order, as the forward's sum
        gx_pairs = gxs.new_empty(gxs.shape)
        gx_pairs.index_copy_(0, order, gxs)
        grad_x = gx_pairs.view(n_tokens, k, -1).sum(dim=1)
        grad_weights = w.new_empty(w.shape).index_copy_(0, order, grad_w).view(n_tokens, k)
        return grad_x, None, None, grad_weights, grad_gate_up, grad_down


def sorted_experts_forward(self: Any, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """The ``ExpertsInterface`` entry: ``self`` is the family's experts module (gated,
    concatenated ``gate_up_proj``, not transposed, no bias, silu)."""
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=self.num_experts).tolist()
    weights = top_k_weights.to(hidden_states.dtype)
    return SortedExperts.apply(hidden_states, order, counts, weights, self.gate_up_proj, self.down_proj)


def supports_sorted(model: Any) -> bool:
    """Whether every experts module of ``model`` has the layout :class:`SortedExperts` computes."""
    found = False
    for module in model.modules():
        if hasattr(module, "gate_up_proj") and hasattr(module, "down_proj") and hasattr(module, "has_gate"):
            found = True
            ok = (module.has_gate and module.is_concatenated and not module.is_transposed and not module.has_bias
                  and not module.has_post_expert_norm and getattr(module.act_fn, "__class__", type(None)).__name__ == "SiLUActivation")
            if not ok:
                return False
    return found


def register() -> None:
    """Register :func:`sorted_experts_forward` with transformers (idempotent)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if SORTED not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(SORTED, sorted_experts_forward)


@contextmanager
def training_experts(model: Any, implementation: str) -> Iterator[None]:
    """Compute ``model``'s experts with ``implementation`` inside the block, then restore the one
    it had (so that a saved config never names an implementation of this package)."""
    if implementation not in EXPERTS_IMPLEMENTATIONS:
        raise ValueError(f"unknown experts implementation {implementation!r}; choose one of {', '.join(EXPERTS_IMPLEMENTATIONS)}")
    if implementation == SORTED:
        if not supports_sorted(model):
            raise ValueError(f"the {SORTED} experts implementation does not support this model's experts")
        register()
    before = model.config._experts_implementation
    model.set_experts_implementation(implementation)
    try:
        yield
    finally:
        model.set_experts_implementation(before)
