"""The atlas's worker pool: how many workers, and which run starts first."""

from __future__ import annotations

from dataclasses import dataclass

from moelens.atlas_pool import choose_workers, critical_order


@dataclass
class _Step:
    name: str
    cost: float
    needs: tuple[str, ...] = ()


def test_runs_start_by_the_longest_chain_they_begin():
    steps = [_Step("alignment", 3), _Step("restore", 60), _Step("cluster", 12), _Step("merge", 15, ("cluster",)),
             _Step("knockout", 22), _Step("distance-clusters", 2, ("cluster",))]
    order = [s.name for s in critical_order(steps)]
    assert order[0] == "restore"
    assert order.index("cluster") < order.index("knockout")  # 12 + 15 of chain beats 22
    assert order.index("cluster") < order.index("merge") and order.index("cluster") < order.index("distance-clusters")
    assert order[-1] == "distance-clusters"


def test_workers_follow_cores_runs_and_memory():
    assert choose_workers(None, 17, True, cpus=2) == 2
    assert choose_workers(None, 1, True, cpus=8) == 1  # one run: no pool
    assert choose_workers(None, 17, False, cpus=8) == 1  # another executor or a GPU
    assert choose_workers(None, 17, True, model_bytes=10 << 30, cpus=8, available_memory=32 << 30) == 1
    assert choose_workers(None, 17, True, model_bytes=1 << 30, cpus=8, available_memory=32 << 30) == 8
    assert choose_workers(3, 2, True, cpus=1) == 2  # asked for: at most one per run
