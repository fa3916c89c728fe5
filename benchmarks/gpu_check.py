"""GPU check: end-to-end ``rank()`` latency of bf16 + CUDA graphs (backend ``"cuda"``) vs eager fp32 on CUDA.

    python -m benchmarks.gpu_check [--candidates 100] [--runs 200] [--out DIR]

Builds the 6-layer bundled MiniLM ranker (``CrossEncoderRanker.build`` over ml-latest-small's item table;
random head) or, without the MiniLM package or the data, a random-weights BERT of MiniLM's size (6 layers,
hidden 384) over a synthetic catalogue. Each request ranks ``--candidates`` random items for a 20-item
history, about 128 tokens per (history, candidate) pair (history 100 tokens, candidate 25). For each mode
(one-pass with the history cache cold and warm, pairwise) it times eager fp32 (``"torch"`` on the GPU) and
``"cuda"``, and compares their scores (max abs difference, Spearman).

Needs a CUDA device (prints a note and exits 0 without one); runs in well under 3 minutes. Writes
``$OUT/gpu_check.json`` when ``$OUT`` is set (else ``benchmarks/results/gpu_check.json``) in the benchmarks'
format and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

from benchmarks.common import RESULTS, latency_ms, round_row, write_results
from data.items import build_item_table
from data.vocab import IdVocab
from ranking.config import RankerConfig, TextConfig
from ranking.cross_encoder import CrossEncoderRanker

TEXT = TextConfig(history_items=20, history_tokens=100, history_item_tokens=16, item_tokens=24)


def build_ranker(mode: str, device: str) -> tuple[CrossEncoderRanker, str]:
    """The bundled MiniLM ranker over ml-latest-small, or a MiniLM-sized random fallback."""
    config = RankerConfig(mode=mode, text=TEXT, kv_cache_users=64)
    try:
        from data.movielens import load_movielens

        table = load_movielens("ml-latest-small", download=False).items
        items = IdVocab(table["item_id"].to_numpy(), name="item")
        ranker = CrossEncoderRanker.build(table, items, config, device=device)
        return ranker, "bundled-minilm on ml-latest-small"
    except Exception as exc:  # noqa: BLE001 - any missing piece selects the fallback, reported in the output
        print(f"fallback to a random MiniLM-sized model: {type(exc).__name__}: {exc}")
    from ranking.testing import WORDS, tiny_encoder, tiny_tokenizer

    rng = np.random.default_rng(0)
    words = [w for w in WORDS if w.isalpha()]
    rows = [{"item_id": i, "title": " ".join(rng.choice(words, size=30)), "genres": "Drama"}
            for i in range(2000)]
    table = build_item_table(pd.DataFrame(rows))
    tokenizer = tiny_tokenizer(Path(os.environ.get("TMPDIR", "/tmp")) / "gpu_check_tokenizer")
    encoder = tiny_encoder(len(tokenizer), hidden=384, layers=6, heads=12, max_positions=512)
    items = IdVocab(table["item_id"].to_numpy(), name="item")
    ranker = CrossEncoderRanker.build(table, items, config, encoder=encoder, tokenizer=tokenizer,
                                      device=device)
    return ranker, "random MiniLM-sized BERT (fallback)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--out", default=os.environ.get("OUT") or str(RESULTS))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing to measure")
        return
    started = time.perf_counter()
    rows: list[dict] = []
    meta = {"device": torch.cuda.get_device_name(0), "candidates": args.candidates, "runs": args.runs}
    for mode in ("one_pass", "pairwise"):
        eager, meta["model"] = build_ranker(mode, "cuda")
        rng = np.random.default_rng(0)
        history = rng.choice(eager.items.ids, 20, replace=False)
        candidates = rng.choice(eager.items.ids, args.candidates, replace=False)
        meta["request_shape"] = eager.request_shape(history, candidates)
        t0 = time.perf_counter()
        fast = eager.with_backend("cuda", device="cuda")
        fast.score(history, candidates)  # captures the graphs this shape needs
        meta[f"{mode}_setup_s"] = round(time.perf_counter() - t0, 2)
        reference = eager.score(history, candidates)
        scores = fast.score(history, candidates)
        agreement = {"max_abs_diff": float(np.abs(scores - reference).max()),
                     "spearman": float(spearmanr(scores, reference).statistic)}
        caches = ("cold", "warm") if mode == "one_pass" else ("none",)
        for name, ranker in (("eager fp32", eager), ("cuda bf16+graphs", fast)):
            for cache in caches:
                def call(_: int, ranker: CrossEncoderRanker = ranker, cold: bool = cache != "warm",
                         history: np.ndarray = history, candidates: np.ndarray = candidates) -> None:
                    if cold:
                        ranker.clear_cache()
                    ranker.rank(history, candidates)

                timing = latency_ms(call, args.runs, warmup=10)
                rows.append(round_row({"method": f"{mode} {name}", "cache": cache, **timing,
                                       **(agreement if name.startswith("cuda") else {})}))
        del eager, fast
        torch.cuda.empty_cache()
    meta["seconds"] = round(time.perf_counter() - started, 1)
    columns = ["method", "cache", "p50_ms", "p99_ms", "max_abs_diff", "spearman"]
    write_results("gpu_check", rows, meta, columns, out_dir=Path(args.out))
    print(f"total {meta['seconds']} s")


if __name__ == "__main__":
    main()
