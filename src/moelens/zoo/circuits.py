"""Are a zoo model's circuits layered? Causal tracing and attention knockout, per layer.

The measurement runs moelens's own layer-wise interventions (:func:`moelens.analyses.interventions.trace`,
docs/methods.md §4) on a zoo's facts and reduces them to per-layer curves:

- causal tracing (``mode="restore"``, site ``restore_hidden``): the subject's embeddings get
  noise, and one layer's clean output is restored at one token. ``restore_subject[ℓ]`` is the
  mean indirect effect of restoring layer ℓ at the last subject token, ``restore_last[ℓ]`` at
  the prompt's last token, each divided by the mean effect of the whole corruption
  (p_clean(target) − p_corrupt(target)), so 1 means "restoring this state alone recovers the
  answer" and 0 "it does nothing";
- attention knockout (``mode="block"``, window ``block_window``): the last position may not
  attend to the subject (``block_subj``), to the other earlier tokens (``block_nonsubj``) or to
  itself (``block_last``) in the layers around ℓ; mean JSD(p_clean, p_blocked) in bits.

:func:`layered_failures` checks the signature of a real language model's fact recall (Meng et
al. 2022; Geva et al. 2023) with stated tolerances: restoring the last subject token recovers the
answer somewhere in the first two thirds of the layers and not in the last third; restoring the
last token recovers it in the last third and not in the first; blocking the subject matters in
several layers, most in the first two thirds, and more than blocking the last token itself.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Circuits:
    """Per-layer curves of one model (index = decoder layer) and what they were measured on."""

    layers: int
    prompts: int
    recall: float
    restore_subject: tuple[float, ...]
    restore_last: tuple[float, ...]
    block_subj: tuple[float, ...]
    block_nonsubj: tuple[float, ...]
    block_last: tuple[float, ...]
    corruption_effect: float
    block_window: int

    def as_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    def table(self) -> str:
        """The curves as a plain-text table, one row per layer."""
        head = f"{'layer':>5} {'restore subj':>12} {'restore last':>12} {'block subj':>10} {'block nonsubj':>13} {'block last':>10}"
        rows = [head] + [
            f"{i:>5} {self.restore_subject[i]:>12.3f} {self.restore_last[i]:>12.3f} {self.block_subj[i]:>10.3f} "
            f"{self.block_nonsubj[i]:>13.3f} {self.block_last[i]:>10.3f}"
            for i in range(self.layers)
        ]
        return "\n".join(rows)


def thirds(n_layers: int) -> tuple[range, range, range]:
    """Layers of the first, middle and last third: [0, ⌈n/3⌉), [⌈n/3⌉, n − ⌈n/3⌉), [n − ⌈n/3⌉, n)."""
    third = -(-n_layers // 3)
    return range(0, third), range(third, n_layers - third), range(n_layers - third, n_layers)


def measure_circuits(
    model: str | os.PathLike[str], facts: str | os.PathLike[str] | list[dict[str, str]], limit: int | None = 64,
    noise_samples: int = 5, block_window: int = 1, seed: int = 0, progress: Any = None,
) -> Circuits:
    """Trace ``model`` on ``limit`` facts it recalls (its clean top-1 is the target, as ROME
    traces only correct predictions), spread over the relations (:func:`spread_over_relations`),
    and reduce the runs to per-layer curves."""
    import pandas as pd

    from moelens.analyses.interventions import trace
    from moelens.runtime import fact_recall, load_causal_lm, load_tokenizer

    records = _records(facts)
    lm, tok = load_causal_lm(model), load_tokenizer(model)
    correct = fact_recall(lm, tok, records, prompt_key="prompt").correct
    recall = float(np.mean(correct))
    kept = [{"prompt": r["prompt"], "subject": r["subject"], "target": r["target"], "relation": r.get("relation", "")}
            for r, ok in zip(records, correct) if ok]
    if not kept:
        raise ValueError(f"{model} recalls none of the {len(records)} facts; there is no circuit to trace")
    kept = [{k: r[k] for k in ("prompt", "subject", "target")} for r in spread_over_relations(kept, limit)]
    n_layers = int(lm.config.num_hidden_layers)
    del lm

    restore = trace(model, kept, mode="restore", sites=("restore_hidden",), noise_samples=noise_samples, seed=seed, progress=progress)
    rows: pd.DataFrame = restore["interventions"]
    per_prompt = rows.groupby("prompt_id")[["p_target_clean", "p_target_corrupt"]].first()
    effect = float((per_prompt["p_target_clean"] - per_prompt["p_target_corrupt"]).mean())
    scale = effect if effect > 1e-6 else float("nan")

    def restore_curve(kind: str) -> tuple[float, ...]:
        part = rows[(rows["site"] == "restore_hidden") & (rows["token_kind"] == kind)]
        mean = part.groupby("layer")["indirect_effect"].mean()
        return tuple(float(mean.get(L, np.nan)) / scale for L in range(n_layers))

    block = trace(model, kept, mode="block", window=block_window, progress=progress)
    summary = block["interventions_summary"]
    jsd = summary[summary["measure"] == "jsd"]

    def block_curve(site: str) -> tuple[float, ...]:
        part = jsd[jsd["site"] == site].set_index("layer")["mean"]
        return tuple(float(part.get(L, np.nan)) for L in range(n_layers))

    return Circuits(
        layers=n_layers, prompts=len(kept), recall=round(recall, 4),
        restore_subject=restore_curve("last_subject"), restore_last=restore_curve("last"),
        block_subj=block_curve("block_subj"), block_nonsubj=block_curve("block_nonsubj"), block_last=block_curve("block_last"),
        corruption_effect=effect, block_window=block_window,
    )


def spread_over_relations(records: list[dict[str, str]], limit: int | None) -> list[dict[str, str]]:
    """``limit`` of ``records`` taken in turn from each relation (in the order relations first
    appear, each relation's records in their own order), so that a zoo's facts file, which lists
    them relation by relation, is not measured on its first relation alone (countries, whose
    names end in a shared piece); all of them when ``limit`` is None."""
    if limit is None or limit >= len(records):
        return list(records)
    by_relation: dict[str, list[dict[str, str]]] = {}
    for r in records:
        by_relation.setdefault(r.get("relation", ""), []).append(r)
    queues = list(by_relation.values())
    out: list[dict[str, str]] = []
    depth = 0
    while len(out) < limit:
        for queue in queues:
            if depth < len(queue) and len(out) < limit:
                out.append(queue[depth])
        depth += 1
    return out


def _records(facts: str | os.PathLike[str] | list[dict[str, str]]) -> list[dict[str, str]]:
    import json
    from pathlib import Path

    if isinstance(facts, (str, os.PathLike)):
        return [json.loads(line) for line in Path(facts).read_text().splitlines() if line.strip()]
    return list(facts)


@dataclass(frozen=True)
class Tolerances:
    """What "recovers" and "matters" mean in :func:`layered_failures`.

    A restore curve recovers the answer at a layer when its value (share of the corruption's
    effect undone) is at least ``recovers``, and does not when it is at most ``no_recovery``;
    blocking matters at a layer when its mean JSD is at least ``matters`` bits, in at least
    ``min_block_layers`` layers."""

    recovers: float = 0.5
    no_recovery: float = 0.25
    matters: float = 0.05
    min_block_layers: int = 2


def layered_failures(c: Circuits, tol: Tolerances = Tolerances(), min_recall: float = 0.9) -> list[str]:
    """The criteria of a layered recall circuit that ``c`` misses, each as one line (empty: all
    met). Needs at least three layers (a first, a middle and a last third)."""
    if c.layers < 3:
        return [f"{c.layers} layers: the criteria compare thirds of the layers and need at least 3"]
    first, middle, last = thirds(c.layers)
    early_mid = list(first) + list(middle)
    subj, lastt = np.asarray(c.restore_subject), np.asarray(c.restore_last)
    bsubj, blast = np.asarray(c.block_subj), np.asarray(c.block_last)
    out = []
    if c.recall < min_recall:
        out.append(f"recall {c.recall:.3f} < {min_recall}")
    if not subj[early_mid].max() >= tol.recovers:
        out.append(f"restoring the last subject token recovers at most {subj[early_mid].max():.2f} in layers 0-{early_mid[-1]} (needs ≥ {tol.recovers})")
    if not subj[list(last)].max() <= tol.no_recovery:
        out.append(f"restoring the last subject token still recovers {subj[list(last)].max():.2f} in the last third (needs ≤ {tol.no_recovery})")
    if not lastt[list(last)].max() >= tol.recovers:
        out.append(f"restoring the last token recovers at most {lastt[list(last)].max():.2f} in the last third (needs ≥ {tol.recovers})")
    if not lastt[list(first)].max() <= tol.no_recovery:
        out.append(f"restoring the last token already recovers {lastt[list(first)].max():.2f} in the first third (needs ≤ {tol.no_recovery})")
    n_matter = int((bsubj >= tol.matters).sum())
    if n_matter < tol.min_block_layers:
        out.append(f"blocking the subject matters (≥ {tol.matters} bits) in {n_matter} layer(s) (needs ≥ {tol.min_block_layers})")
    if int(np.argmax(bsubj)) in last:
        out.append(f"blocking the subject matters most in layer {int(np.argmax(bsubj))}, in the last third")
    if not blast.mean() < bsubj.mean():
        out.append(f"blocking the last token ({blast.mean():.3f} bits on average) matters as much as blocking the subject ({bsubj.mean():.3f})")
    return out


__all__ = ["Circuits", "Tolerances", "layered_failures", "measure_circuits", "thirds"]
