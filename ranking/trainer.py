"""Fine-tuning the cross-encoder: PEFT adapters, a listwise softmax loss, early stopping, merging.

* **Adapters**: peft's ``get_peft_model`` injects LoRA (default) or AdaLoRA into every encoder layer's
  ``query``/``key``/``value``, attention output, intermediate and output projections; the scoring head is
  trained in full (``modules_to_save``). The base weights stay frozen.
* **Loss**: per list, softmax cross-entropy of the positive against its negatives
  (:mod:`ranking.data`: mostly hard negatives from the retriever's top K, some uniform). With
  ``objective="residual"`` the lists are a prefix retriever's top M instead and each logit is the
  cross-encoder score plus a fixed retrieval offset, so the model learns a correction of the retrieval order
  (:mod:`ranking.residual`); the validation metric then ranks by offset + score too.
* **Early stopping** on the validation NDCG@10 of the reranked top-M list; the best adapters are kept.
* **Merging**: :func:`merge_adapters` folds the adapters into the base weights and returns a plain
  :class:`~ranking.encoder.CrossEncoder` (same scores, no peft at inference).

Seeds fix the head, the adapters, dropout and sampling. :func:`fit_on_split` runs the whole recipe on a
protocol split; ``python -m ranking.trainer`` does that on ml-latest-small and saves the ranker.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from data.errors import DataValidationError
from data.protocol import Split
from ranking.backends import TorchBackend
from ranking.config import RankerConfig, TrainerConfig
from ranking.cross_encoder import CrossEncoderRanker
from ranking.data import (
    ListBatches,
    ListTrainingLog,
    ValidationLists,
    reranked_ndcg,
    retrieval_rows,
    stage_retriever,
    user_sequences,
    validation_lists,
)
from ranking.encoder import CrossEncoder
from ranking.inputs import one_pass_batch, pairwise_batch
from ranking.residual import ResidualBatches, base_offsets, fit_base, fit_prefix_retriever, position_lists
from ranking.scoring import score_lists
from retrieval.trainer import resolve_device, seed_everything, torch_threads

log = logging.getLogger(__name__)

_SELF_ATTENTION = ("query", "key", "value")


def target_regex(targets: tuple[str, ...]) -> str:
    """A regex matching exactly the named projections inside every ``encoder.layer.<i>``.

    ``"query"``/``"key"``/``"value"`` mean ``attention.self.<name>``; other names are paths inside the
    layer (``"output.dense"`` is the feed-forward output, not ``attention.output.dense``).
    """
    paths = [f"attention.self.{t}" if t in _SELF_ATTENTION else t for t in targets]
    return r"^(?:.*\.)?encoder\.layer\.\d+\.(?:" + "|".join(re.escape(p) for p in paths) + r")$"


def apply_peft(model: CrossEncoder, config: TrainerConfig) -> Any:
    """Wrap ``model`` with LoRA or AdaLoRA adapters (base frozen, head fully trainable)."""
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    targets = target_regex(config.target_modules)
    if config.peft == "lora":
        peft_config = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                                 target_modules=targets, modules_to_save=["head"])
    else:
        total = config.max_steps
        tinit, tfinal = max(1, total // 10), max(1, total // 5)
        if tinit + tfinal >= total:
            tinit, tfinal = 0, 0
        peft_config = AdaLoraConfig(init_r=config.lora_r, target_r=config.adalora_target_r,
                                    lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                                    target_modules=targets, modules_to_save=["head"], total_step=total,
                                    tinit=tinit, tfinal=tfinal, deltaT=max(1, total // 20))
    return get_peft_model(model, peft_config)


def merge_adapters(peft_model: Any) -> CrossEncoder:
    """Fold the adapters into the base weights; returns the plain model (the trained head in place)."""
    merged = peft_model.merge_and_unload()
    leftover = [n for n, _ in merged.named_parameters() if "lora_" in n or "modules_to_save" in n]
    if leftover:
        raise RuntimeError(f"merge_adapters: adapter parameters left after merging: {leftover[:3]}")
    for parameter in merged.parameters():
        parameter.requires_grad_(False)
    return merged.eval()


def _orthogonal_penalty(model: torch.nn.Module) -> torch.Tensor:
    """AdaLoRA's orthogonality regulariser of ``P = A`` and ``Q = B`` (peft adds it only to HF outputs)."""
    total, count = None, 0
    for name, p in model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and p.requires_grad and p.numel():
            cov = p @ p.T if "lora_A" in name else p.T @ p
            eye = torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)
            term = torch.linalg.matrix_norm(cov - eye)
            total = term if total is None else total + term
            count += 1
    return total / count if count else torch.zeros(())


def list_scores(model: CrossEncoder, mode: str, histories: list[np.ndarray], lists: np.ndarray,
                ranker: CrossEncoderRanker, device: torch.device) -> torch.Tensor:
    """``(B, 1 + n)`` training scores of item-row lists (with gradients)."""
    tokens = ranker.tokens
    history_ids = [tokens.history(h) for h in histories]
    pad = tokens.special.pad
    if mode == "pairwise":
        width = lists.shape[1]
        batch = pairwise_batch([h for h in history_ids for _ in range(width)], tokens.candidates(lists.ravel()), pad)
        return model.score_pairwise(batch.to(device)).view(-1, width)
    batch = one_pass_batch(history_ids, [tokens.candidates(row) for row in lists], pad)
    return model.score_one_pass(batch.to(device)).view(lists.shape[0], -1)


@dataclass
class TrainingLog(ListTrainingLog):
    """What a training run did: :class:`~ranking.data.ListTrainingLog` (``best_step`` is the step whose
    adapters were kept; ``history`` records ``step``, ``loss``, ``metric``, ``seconds``) plus:

    Attributes:
        peft: ``"lora"`` or ``"adalora"``.
        trainable_parameters: adapter + head parameters trained.
    """

    peft: str = "lora"
    trainable_parameters: int = 0


def validate(ranker: CrossEncoderRanker, model: CrossEncoder, validation: ValidationLists, device: torch.device,
             batch_size: int = 64) -> float:
    """Reranked NDCG@10 of ``model`` on the validation lists (eval mode, no gradients)."""
    backend = TorchBackend(model, device)
    scores = score_lists(backend, ranker.tokens, ranker.mode, validation.histories, validation.candidates,
                         batch_size=batch_size)
    if validation.offsets is not None:
        scores = scores + validation.offsets
    return reranked_ndcg(scores, validation.target_col, validation.n_users)


def train_ranker(ranker: CrossEncoderRanker, seqs: list[np.ndarray], pools: np.ndarray,
                 validation: ValidationLists | None, config: TrainerConfig | None = None, *,
                 residual: ResidualBatches | None = None) -> tuple[CrossEncoderRanker, TrainingLog]:
    """Fine-tune ``ranker`` (its model is changed in place while training) and return a new ranker with the
    best adapters merged, plus the log.

    Args:
        ranker: a ranker from :meth:`CrossEncoderRanker.build` (mode fixed by its config).
        seqs: per user row, training item rows in time order.
        pools: ``(n_users, K)`` hard-negative pools (retrieval item rows, ``-1`` pads).
        validation: lists for early stopping (``None``: train ``max_steps`` and keep the last adapters).
        config: the training config.
        residual: the residual objective's batches (:mod:`ranking.residual`): each list's logits are the
            cross-encoder scores plus the batch's offsets, and ``seqs``/``pools`` only pick the users.
    """
    c = config or TrainerConfig()
    if pools.shape[0] != len(seqs):
        raise DataValidationError(f"pools has {pools.shape[0]} rows but there are {len(seqs)} user sequences")
    device = resolve_device(c.device)
    seed_everything(c.seed)
    rng = np.random.default_rng(c.seed)
    users = np.arange(len(seqs))
    users = users[np.array([s.size > c.min_history for s in seqs], dtype=bool)] if len(seqs) else users
    if c.max_users and users.size > c.max_users:
        users = np.sort(rng.choice(users, size=c.max_users, replace=False))
    if users.size == 0:
        raise DataValidationError(f"no user has more than min_history={c.min_history} training items")
    model = ranker.model.to(device)
    peft_model = apply_peft(model, c)
    head_params = [p for n, p in peft_model.named_parameters() if p.requires_grad and "modules_to_save" in n]
    adapter_params = [p for n, p in peft_model.named_parameters() if p.requires_grad and "modules_to_save" not in n]
    optimizer = torch.optim.AdamW([
        {"params": adapter_params, "lr": c.learning_rate},
        {"params": head_params, "lr": c.head_learning_rate},
    ], weight_decay=c.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, c.warmup_steps)) * max(0.05, 1 - s / c.max_steps))
    log_ = TrainingLog(device=str(device), peft=c.peft,
                       trainable_parameters=sum(p.numel() for p in adapter_params + head_params))
    if validation is not None:
        log_.retrieval_metric = validation.retrieval_ndcg
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    best_state = None
    bad, started, losses = 0, time.perf_counter(), []
    batches = ListBatches(seqs, pools, len(ranker.items), c, rng, users, c.batch_size)
    with torch_threads(c.threads):
        if validation is not None and c.eval_at_start:
            metric = validate(ranker, model, validation, device)
            log_.history.append({"step": 0, "loss": float("nan"), "metric": round(metric, 6), "seconds": 0.0})
            log_.best_metric, log_.best_step = metric, 0
            best_state = {n: p.detach().clone() for n, p in trainable.items()}
        bar = tqdm(range(1, c.max_steps + 1), desc=f"rerank-{ranker.mode}", unit="step", disable=not c.progress)
        peft_model.train()
        for step in bar:
            tick = time.perf_counter()
            if residual is None:
                histories, items = batches.next()
                target = torch.zeros(len(histories), dtype=torch.long, device=device)
                log_.n_train_lists = batches.drawn
            else:
                histories, items, offsets, target_col = residual.next()
                target = torch.as_tensor(target_col, dtype=torch.long, device=device)
                log_.n_train_lists = residual.drawn
            scores = list_scores(model, ranker.mode, histories, items, ranker, device)
            if residual is not None:
                scores = scores + torch.as_tensor(offsets, dtype=scores.dtype, device=device)
            loss = F.cross_entropy(scores, target)
            if c.peft == "adalora":
                loss = loss + 0.1 * _orthogonal_penalty(peft_model)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if c.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(adapter_params + head_params, c.grad_clip)
            optimizer.step()
            schedule.step()
            if c.peft == "adalora":
                peft_model.base_model.update_and_allocate(step)
            losses.append(float(loss.detach()))
            log_.train_seconds += time.perf_counter() - tick
            log_.steps = step
            if validation is not None and (step % c.eval_every == 0 or step == c.max_steps):
                metric = validate(ranker, model, validation, device)
                peft_model.train()
                mean_loss = float(np.mean(losses)) if losses else float("nan")
                losses = []
                log_.history.append({"step": step, "loss": round(mean_loss, 5), "metric": round(metric, 6),
                                     "seconds": round(time.perf_counter() - started, 1)})
                bar.set_postfix(loss=f"{mean_loss:.3f}", ndcg=f"{metric:.4f}")
                if math.isnan(log_.best_metric) or metric > log_.best_metric:
                    log_.best_metric, log_.best_step, bad = metric, step, 0
                    best_state = {n: p.detach().clone() for n, p in trainable.items()}
                else:
                    bad += 1
                    if bad >= c.patience:
                        log_.stopped_early = True
                        break
            elif step % 10 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
        if best_state is not None:
            with torch.no_grad():
                for n, p in trainable.items():
                    p.copy_(best_state[n])
    log_.seconds = time.perf_counter() - started
    log_.lists_per_s = log_.steps * c.batch_size / max(log_.train_seconds, 1e-9)
    merged = merge_adapters(peft_model).to("cpu")
    trained = CrossEncoderRanker(merged, ranker.tokens, ranker.config, encoder_config=ranker.encoder_config,
                                 tokenizer=ranker.tokenizer, meta={**ranker.meta, "training": log_.to_dict(),
                                                                   "trainer_config": c.to_dict()})
    return trained, log_


def warm_start(source: CrossEncoderRanker, mode: str) -> CrossEncoderRanker:
    """An untrained-for-``mode`` ranker holding a copy of ``source``'s weights (encoder and head), to pass
    as ``ranker=`` to :func:`fit_on_split` (same catalogue and text settings as ``source``)."""
    return CrossEncoderRanker(copy.deepcopy(source.model), source.tokens, dataclasses.replace(source.config, mode=mode),
                              encoder_config=source.encoder_config, tokenizer=source.tokenizer,
                              meta={"initialised_from": source.mode})


def fit_on_split(split: Split, retriever: Any, item_table: Any, ranker_config: RankerConfig | None = None,
                 config: TrainerConfig | None = None, *, ranker: CrossEncoderRanker | None = None,
                 ) -> tuple[CrossEncoderRanker, TrainingLog]:
    """The whole recipe on a protocol split.

    ``retriever`` must be fitted on ``split.history("val")`` (the training events): its top ``hard_pool``
    per user gives the hard negatives and its top ``val_candidates`` the validation lists. The ranker is
    built from ``ranker_config`` (the base model plus a new head) unless an untrained ``ranker`` over
    ``split.items`` is given. Returns the trained ranker (adapters merged, histories set to the training
    events) and its log.
    """
    c = config or TrainerConfig()
    if ranker is None:
        ranker = CrossEncoderRanker.build(item_table, split.items, ranker_config or RankerConfig(), seed=c.seed)
    elif ranker.items != split.items:
        raise DataValidationError("fit_on_split: the ranker's catalogue is not split.items; build it over them")
    users = split.users
    seqs = user_sequences(split.train, users, split.items)
    pools = retrieval_rows(retriever, users.ids, c.hard_pool, split.items)
    val = split.targets("val")
    if c.val_users and len(val) > c.val_users:
        val = val.sample(n=c.val_users, random_state=c.seed)
    val_users = users.rows(val["user_id"].to_numpy())
    val_ids, val_scores = retriever.retrieve(val["user_id"].to_numpy(), c.val_candidates, exclude_seen=True)
    val_ids, val_scores = np.atleast_2d(val_ids), np.atleast_2d(val_scores)
    candidates = split.items.rows(val_ids.ravel(), missing="ignore").reshape(val_ids.shape)
    targets = split.items.rows(val["item_id"].to_numpy(), missing="ignore")
    validation = validation_lists([seqs[u] for u in val_users], candidates, targets)
    log.info("validation: %d of %d users have the target in the top %d", len(validation), validation.n_users,
             c.val_candidates)
    residual = None
    if c.objective == "residual":
        residual, base = residual_batches(retriever, split, seqs, c)
        hit = (candidates == targets[:, None]).any(axis=1) & (targets >= 0)
        validation.offsets = base_offsets(base, val_scores[hit])
        ranker.meta = {**ranker.meta, "residual_base": base.to_dict()}
    trained, record = train_ranker(ranker, seqs, pools, validation, c, residual=residual)
    trained.set_history(split.train)
    return trained, record


def residual_batches(retriever: Any, split: Split, seqs: list[np.ndarray], config: TrainerConfig,
                     ) -> tuple[ResidualBatches, Any]:
    """The residual objective's training batches and its base blend: a prefix retriever (``retriever``'s
    kind, fitted without each user's last ``residual_tail`` training events) gives the lists of those
    positions, the base blend is fitted on them (see :mod:`ranking.residual`)."""
    c = config
    started = time.perf_counter()
    prefix = fit_prefix_retriever(retriever, split, c.residual_tail)
    lists = position_lists(prefix, seqs, c.residual_tail, c.val_candidates, c.min_history, progress=c.progress)
    base = fit_base(lists)
    log.info("residual lists: %d of %d positions hold the positive in the prefix retriever's top %d (%.0f s); "
             "base weights %s", len(lists), lists.n_positions, c.val_candidates, time.perf_counter() - started,
             base.report.get("weights"))
    rng = np.random.default_rng(c.seed + 1)
    return ResidualBatches(lists, base_offsets(base, lists.retrieval), rng, c.batch_size), base


def main(argv: list[str] | None = None) -> None:
    """Train a reranker on ml-latest-small (ALS candidates unless told otherwise) and save it."""
    parser = argparse.ArgumentParser(description="Fine-tune the cross-encoder reranker on ml-latest-small.")
    parser.add_argument("--data-path", default=None, help="folder with ml-latest-small (else SHORTLIST_DATA_DIR)")
    parser.add_argument("--out", required=True, help="folder to save the trained ranker to")
    parser.add_argument("--mode", choices=("pairwise", "one_pass"), default="one_pass")
    parser.add_argument("--retriever", default="als", help="retriever name for candidates (als, two_tower, ...)")
    parser.add_argument("--config", default=None, help="TrainerConfig JSON file (fields override defaults)")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--patience", type=int, default=None, help="evaluations without a gain before stopping")
    parser.add_argument("--device", default=None, help="cpu, cuda or auto")
    parser.add_argument("--peft", choices=("lora", "adalora"), default=None)
    parser.add_argument("--objective", choices=("listwise", "residual"), default=None,
                        help="residual: learn a correction on top of out-of-sample retrieval scores")
    parser.add_argument("--residual-tail", type=int, default=None,
                        help="residual objective: positions per user, from the end, that become lists")
    parser.add_argument("--init", default=None,
                        help="warm start from this saved ranker folder (same catalogue) instead of the base model")
    parser.add_argument("--eval-at-start", action="store_true",
                        help="evaluate before training, so early stopping can keep the starting weights")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from data.movielens import load_movielens
    from data.protocol import apply_filters, leave_one_out

    config = TrainerConfig.load(args.config) if args.config else TrainerConfig()
    overrides = {k: v for k, v in (("max_steps", args.max_steps), ("patience", args.patience),
                                   ("device", args.device), ("peft", args.peft),
                                   ("objective", args.objective), ("residual_tail", args.residual_tail))
                 if v is not None}
    if args.eval_at_start:
        overrides["eval_at_start"] = True
    config = TrainerConfig.from_dict({**config.to_dict(), **overrides})
    raw = load_movielens("ml-latest-small", args.data_path)
    split = leave_one_out(apply_filters(raw))
    retriever = stage_retriever(args.retriever, split, "val")
    start = None
    if args.init:
        start = warm_start(CrossEncoderRanker.load(args.init), args.mode)
    ranker, record = fit_on_split(split, retriever, raw.items, RankerConfig(mode=args.mode), config, ranker=start)
    ranker.save(args.out, metrics={"val_ndcg@10": record.best_metric})
    print(f"saved {args.out}: best validation NDCG@10 {record.best_metric:.4f} at step {record.best_step} "
          f"(retrieval order {record.retrieval_metric:.4f}), {record.seconds:.0f} s")


if __name__ == "__main__":
    main()
