"""HC-SMoE's expert features: the mean output of every expert over ALL calibration tokens.

    feature_e = (1/N) Σ_t f_e(x_t),   f_e(x) = W_down^e h_e(x) + b_down^e,
    h_e(x) = act(W_gate^e x + b_gate^e) ⊙ (W_up^e x + b_up^e)

(not weighted by the router: every expert sees every token). W_down is linear, so
(1/N) Σ_t f_e(x_t) = W_down^e ((1/N) Σ_t h_e(x_t)) + b_down^e: the tokens only ever meet the gate
and up matrices, and the down projection is applied once per expert to the mean activation. That
saves a third of the work and keeps nothing of size N × E × d.

Work is batched over experts: a chunk of n tokens X [n, d] meets all gates at once as one product
X · [W_gate^1; …; W_gate^E]ᵀ → [n, E·F] (the same for up), so the device sees one large GEMM
instead of E small ones. Chunks are sized so that g, u and h of a chunk stay within a memory
budget; per-chunk sums (float32) are added into a float64 accumulator, and the final down
projection runs in float64.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from moelens.calibration.activation import ExpertActivation

#: Bytes that one chunk's g, u and h [n, E, F] may take (float32); the CPU keeps it smaller.
CHUNK_BYTES = {"cuda": 1 << 30, "cpu": 128 << 20}


class ExpertFeatures:
    """Σ_t h_e(x_t) over token chunks as they stream past; :meth:`result` gives the [E, d] means.

    ``gate``/``up`` [E, F, d] (``gate`` may be None), ``down`` [E, d, F], biases [E, F], [E, F],
    [E, d] or None, in any dtype: they are copied once to ``device`` in ``dtype`` (float32 by
    default; one layer in memory)."""

    def __init__(self, gate: Optional[torch.Tensor], up: torch.Tensor, down: torch.Tensor, activation: ExpertActivation,
                 gate_bias: Optional[torch.Tensor] = None, up_bias: Optional[torch.Tensor] = None,
                 down_bias: Optional[torch.Tensor] = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, chunk_bytes: Optional[int] = None):
        self.device = torch.device(device)
        self.dtype = dtype
        self.n_experts, self.f, self.d = int(up.shape[0]), int(up.shape[1]), int(up.shape[2])
        e, f, d = self.n_experts, self.f, self.d

        def flat(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            # [E, F, d] -> [E·F, d]: row e·F + p is neuron p of expert e
            return None if t is None else t.to(self.device, dtype).reshape(e * f, d)

        def vec(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.to(self.device, dtype).reshape(e * f)

        self.gate, self.up = flat(gate), flat(up)
        self.gate_bias, self.up_bias = vec(gate_bias), vec(up_bias)
        self.down = down  # applied once, in float64, by result()
        self.down_bias = down_bias
        self.activation = activation
        budget = chunk_bytes if chunk_bytes is not None else CHUNK_BYTES["cuda" if self.device.type == "cuda" else "cpu"]
        per_token = 3 * e * f * torch.tensor([], dtype=dtype).element_size()
        self.chunk_tokens = max(1, int(budget // per_token))
        self.sum_h = torch.zeros(e * f, dtype=torch.float64, device=self.device)
        self.n_tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """Fold the tokens ``x`` [n, d] (block inputs) into the sums."""
        for start in range(0, x.shape[0], self.chunk_tokens):
            chunk = x[start:start + self.chunk_tokens].to(self.device, self.dtype)  # [n, d]
            u = chunk @ self.up.T                                                   # [n, E·F]
            if self.up_bias is not None:
                u = u + self.up_bias
            g = None
            if self.gate is not None:
                g = chunk @ self.gate.T                                             # [n, E·F]
                if self.gate_bias is not None:
                    g = g + self.gate_bias
            h = self.activation(g, u)                                               # [n, E·F]
            self.sum_h += h.sum(0, dtype=torch.float64)
            self.n_tokens += int(chunk.shape[0])

    def mean_activation(self) -> torch.Tensor:
        """[E, F] float64: (1/N) Σ_t h_e(x_t)."""
        if self.n_tokens == 0:
            raise ValueError("no tokens were added")
        return (self.sum_h / self.n_tokens).reshape(self.n_experts, self.f)

    def result(self, n_total: Optional[int] = None) -> np.ndarray:
        """[E, d] float64: every expert's mean output over the tokens added; with ``n_total``
        (the tokens of every shard of the calibration) this shard's share of it,
        Σ_{t ∈ shard} f_e(x_t) / N, so that the shards' results add up to the mean."""
        if n_total is None or n_total == self.n_tokens:
            mean_h = self.mean_activation()                                      # [E, F]
            bias_share = None
        else:
            mean_h = (self.sum_h / n_total).reshape(self.n_experts, self.f)      # [E, F]
            bias_share = self.n_tokens / n_total
        out = torch.empty(self.n_experts, self.d, dtype=torch.float64, device=self.device)
        step = 16  # experts per float64 copy of W_down: a slice of the layer, not all of it
        for s in range(0, self.n_experts, step):
            down = self.down[s:s + step].to(self.device, torch.float64)          # [e, d, F]
            out[s:s + step] = torch.einsum("edf,ef->ed", down, mean_h[s:s + step])
        if self.down_bias is not None:
            bias = self.down_bias.to(self.device, torch.float64)
            out += bias if bias_share is None else bias * bias_share
        return out.cpu().numpy()


__all__ = ["CHUNK_BYTES", "ExpertFeatures"]
