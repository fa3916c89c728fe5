"""What the two-tower's exact (full) softmax costs against the sampled softmax, by catalogue size.

    python -m benchmarks.loss_cost [--sizes 3650,6000,10000,25000,100000] [--steps 8]

One training step (forward and backward through both towers and the loss) of the default two-tower
config on a synthetic catalogue of each size: 8 windows of 200 positions (1,600 next-item targets), 64-d
towers, 20 genres, text features of width 64, one torch thread. Both losses recompute every item vector
each step, so the sampled softmax also grows with the catalogue; the full softmax adds a 1,600 x n logit
matrix and its gradient. The ratio full/sampled is the cost the search's catalogue limit
(:data:`retrieval.two_tower.FULL_SOFTMAX_MAX_ITEMS`) is set from. Writes ``benchmarks/results/loss_cost.json``.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch

from benchmarks.common import round_row, write_results
from pipeline.report import markdown_table
from retrieval.losses import FullSoftmaxLoss, SampledSoftmaxLoss
from retrieval.towers import ItemTower, QueryTower
from retrieval.trainer import ItemInputs, item_vectors, torch_threads, with_padding_row
from retrieval.two_tower import FULL_SOFTMAX_MAX_ITEMS, TwoTowerConfig

SIZES = (3_650, 6_000, 10_000, 25_000, 100_000)
LIMIT_RATIO = 3.5  # the search's limit: the largest catalogue whose full-softmax step costs <= 3.5x


def step_ms(n_items: int, loss_name: str, *, steps: int = 8, seed: int = 0) -> float:
    """Median wall time (ms) of one training step on a random catalogue of ``n_items``."""
    c = TwoTowerConfig()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    inputs = ItemInputs.from_numpy((rng.random((n_items, 20)) < 0.1).astype(np.float32),
                                   rng.integers(0, 20, n_items), rng.normal(size=(n_items, 64)).astype(np.float32),
                                   rng.integers(0, 50, n_items).astype(np.float32))
    item_tower = ItemTower(n_items, c.dim, n_genres=20, n_year_buckets=21, text_dim=64, id_dropout=c.id_dropout)
    query_tower = QueryTower(c.dim, max_len=c.max_len, n_blocks=c.n_blocks, n_heads=c.n_heads, dropout=c.dropout,
                             ffn_mult=c.ffn_mult)
    if loss_name == "full_softmax":
        loss_fn: Any = FullSoftmaxLoss()
    else:
        loss_fn = SampledSoftmaxLoss(torch.ones(n_items), n_uniform=c.n_uniform_negatives,
                                     n_inbatch=c.n_inbatch_negatives)
    params = list(item_tower.parameters()) + list(query_tower.parameters())
    optimizer = torch.optim.AdamW(params, lr=c.learning_rate)
    seqs = torch.as_tensor(rng.integers(1, n_items + 1, (c.batch_size, c.max_len)))
    targets = torch.as_tensor(rng.integers(0, n_items, (c.batch_size, c.max_len)))
    times = []
    with torch_threads(1):
        for _ in range(steps + 2):
            tick = time.perf_counter()
            vectors = item_vectors(item_tower, inputs)
            hidden = query_tower(seqs, with_padding_row(vectors))
            loss = loss_fn(hidden.reshape(-1, c.dim), targets.reshape(-1), vectors)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            times.append((time.perf_counter() - tick) * 1000)
    return float(np.median(times[2:]))


def run(sizes=SIZES, steps: int = 8) -> dict[str, Any]:
    rows = []
    for n in sizes:
        sampled = step_ms(n, "sampled_softmax", steps=steps)
        full = step_ms(n, "full_softmax", steps=steps)
        rows.append(round_row({"method": f"n_items={n:,}", "n_items": n, "sampled_step_ms": sampled,
                               "full_step_ms": full, "full_over_sampled": full / sampled}, 3))
    columns = ["method", "sampled_step_ms", "full_step_ms", "full_over_sampled"]
    print(markdown_table(rows, columns))
    path = write_results("loss_cost", rows, {
        "what": "one two-tower training step (1,600 targets, default config, 1 thread), median of steps",
        "steps": steps, "full_softmax_max_items": FULL_SOFTMAX_MAX_ITEMS, "limit_ratio": LIMIT_RATIO})
    within = [r["n_items"] for r in rows if r["full_over_sampled"] <= LIMIT_RATIO]
    print(f"\nsearch limit: full softmax tried up to {FULL_SOFTMAX_MAX_ITEMS:,} items; measured here: largest size "
          f"with full/sampled <= {LIMIT_RATIO:g}x: {max(within) if within else 'none'}\nwrote {path}")
    return {"rows": rows, "path": path}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="comma-separated catalogue sizes")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per size and loss")
    args = parser.parse_args(argv)
    run(tuple(int(s) for s in args.sizes.split(",")), args.steps)


if __name__ == "__main__":
    main()
