"""Training the item-token reranker (:mod:`ranking.item_model`), distilling it, and fitting its hybrid head.

* :func:`train_item_ranker`: the listwise softmax of each training position's positive against hard
  negatives (the retriever's top ``hard_pool`` for that prefix) and uniform ones, over every training
  position (:mod:`ranking.item_lists`), AdamW with warm-up and cosine decay over ``max_steps``. Every
  ``eval_every`` steps the model reranks the retriever's top ``val_candidates`` for each validation target
  and the weights with the best validation NDCG@10 are kept. A narrow encoder trains in full; with
  ``peft`` set (the MiniLM encoder's default) the encoder is frozen and adapted with LoRA/AdaLoRA through
  peft, the item inputs, embeddings and head train in full, and the adapters are merged at the end.
* With a ``teacher`` (distillation, :func:`distill_item_ranker`), a listwise KL to the teacher's scores on
  the same lists is added to the loss. The student starts from the teacher's weights with a subset of its
  layers (:func:`student_from`).
* :func:`fit_hybrid_head`: a :class:`~ranking.blend.HybridBlend` over the model's score, the retrieval
  score and rank and (when validation prefers it) the co-visitation score, fitted on the validation lists
  (targets the model never trained on) and kept only when it beats the retrieval order in
  cross-validation; it travels in the ranker's manifest.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from data.errors import ConfigError, DataValidationError
from data.protocol import Split
from ranking.data import ListTrainingLog, ValidationLists, reranked_ndcg, user_sequences, validation_lists
from ranking.item_config import ItemTrainerConfig
from ranking.item_lists import PositionBatches, prefix_pools, training_positions
from ranking.item_model import ItemTokenModel, history_tensor
from ranking.item_ranker import ItemTokenRanker
from ranking.trainer import merge_adapters, resolve_device, seed_everything, target_regex
from retrieval.trainer import torch_threads

log = logging.getLogger(__name__)


@dataclass
class ItemTrainingLog(ListTrainingLog):
    """What a training (or distillation) run did (the shared fields are in
    :class:`~ranking.data.ListTrainingLog`).

    Attributes:
        positions: training positions (lists per epoch).
        epochs: passes over the positions (fractional).
        pool_hit_rate: share of training positions whose positive the retriever ranks inside its top
            ``hard_pool`` (in-sample: the retriever trained on these events).
        val_hit_rate: the same share on the validation targets (out of sample), at ``val_candidates``.
        peft: ``""`` (full training) or the peft method.
        teacher: the teacher's folder or description when distilled, else ``""``.
        trainable_parameters: parameters the optimizer updated.
    """

    positions: int = 0
    epochs: float = 0.0
    pool_hit_rate: float = float("nan")
    val_hit_rate: float = float("nan")
    peft: str = ""
    teacher: str = ""
    trainable_parameters: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def stage_candidates(retriever: Any, split: Split, stage: str, depth: int, items: Any) -> tuple[Any, np.ndarray,
                                                                                                  np.ndarray]:
    """``(cases, candidate rows (n, depth), retrieval scores (n, depth))`` of ``stage``'s cases (item rows of
    ``items``; ``-1``/``-inf`` pad). The retriever must hold ``split.history(stage)``."""
    from retrieval.evaluate import retrieve_cases

    cases = split.cases(stage)
    ids, scores = retrieve_cases(retriever, cases, depth)
    rows = np.full(ids.shape, -1, dtype=np.int64)
    valid = ids >= 0
    rows[valid] = items.rows(ids[valid], missing="ignore")
    scores = np.where(rows >= 0, scores, -np.inf).astype(np.float32)
    return cases, rows, scores


def validation_set(retriever: Any, split: Split, items: Any, depth: int) -> tuple[ValidationLists, np.ndarray]:
    """The validation lists (targets inside the retriever's top ``depth``) and their retrieval scores."""
    cases, rows, scores = stage_candidates(retriever, split, "val", depth, items)
    histories = [items.rows(h, missing="ignore") for h in cases.histories]
    histories = [h[h >= 0] for h in histories]
    targets = items.rows(cases.targets, missing="ignore")
    lists = validation_lists(histories, rows, targets)
    keep = np.flatnonzero(((rows == targets[:, None]) & (targets[:, None] >= 0)).any(axis=1))
    return lists, scores[keep]


def model_scores(model: ItemTokenModel, histories: list[np.ndarray], candidates: np.ndarray, max_history: int,
                 device: torch.device, batch_size: int = 128) -> np.ndarray:
    """``(n, M)`` scores of candidate rows (``-1`` pads, scored ``-inf``) in eval mode, inference only."""
    out = np.full(candidates.shape, -np.inf, dtype=np.float32)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(histories), batch_size):
                stop = min(start + batch_size, len(histories))
                rows, mask = history_tensor(histories[start:stop], max_history)
                cands = candidates[start:stop]
                scores = model(rows.to(device), mask.to(device), torch.as_tensor(np.maximum(cands, 0)).to(device))
                out[start:stop] = np.where(cands >= 0, scores.float().cpu().numpy(), -np.inf)
    finally:
        if was_training:
            model.train()
    return out


def _apply_peft(model: ItemTokenModel, config: ItemTrainerConfig) -> Any:
    """Wrap ``model`` with peft adapters on the encoder layers; everything outside them stays trainable."""
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    targets = target_regex(config.target_modules)
    if config.peft == "lora":
        peft_config = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                                 target_modules=targets)
    else:
        total = config.max_steps
        tinit, tfinal = max(1, total // 10), max(1, total // 5)
        if tinit + tfinal >= total:
            tinit, tfinal = 0, 0
        peft_config = AdaLoraConfig(init_r=config.lora_r, target_r=max(1, config.lora_r // 2),
                                    lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                                    target_modules=targets, total_step=total, tinit=tinit, tfinal=tfinal,
                                    deltaT=max(1, total // 20))
    wrapped = get_peft_model(model, peft_config)
    for name, parameter in wrapped.named_parameters():
        if ".encoder.layer." not in name:  # item inputs, embeddings block, head: trained in full
            parameter.requires_grad_(True)
    return wrapped


def _schedule(step: int, config: ItemTrainerConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / max(1, config.warmup_steps)
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_item_ranker(ranker: ItemTokenRanker, split: Split, retriever: Any, config: ItemTrainerConfig | None = None,
                      *, teacher: ItemTokenRanker | None = None, teacher_name: str = "") -> ItemTrainingLog:
    """Train ``ranker`` in place on ``split``'s training events with ``retriever``'s candidates (see the
    module docstring); returns the log. ``retriever`` must hold ``split.history("val")``. The kept weights
    are those of the best validation NDCG@10 (the last step's without validation lists)."""
    c = config or ItemTrainerConfig()
    started = time.perf_counter()
    device = resolve_device(c.device)
    seed_everything(c.seed)
    rng = np.random.default_rng(c.seed)
    items = ranker.items
    if retriever.history_fingerprint != split.history("val").fingerprint():
        raise DataValidationError("train_item_ranker: the retriever must hold split.history('val') (fit it on the "
                                  "training events, as pipeline.stages.candidate_retriever does)")
    seqs = user_sequences(split.history("val"), split.users, items)
    positions = training_positions(seqs, c.min_history)
    with torch_threads(c.threads):
        pools, hit = (prefix_pools(retriever, seqs, positions, items, c.hard_pool, progress=c.progress)
                      if c.n_hard else (None, float("nan")))
        validation, _ = validation_set(retriever, split, items, c.val_candidates)
    batches = PositionBatches(seqs, positions, pools, len(items), c.n_hard, c.n_uniform, c.batch_size, rng,
                              hard_horizon=c.hard_horizon)
    model = ranker.model.to(device)
    for parameter in model.parameters():  # a loaded (or distilled-from) model comes frozen
        parameter.requires_grad_(not c.peft)
    trained = _apply_peft(model, c) if c.peft else model
    trained.train()
    params = [p for p in trained.parameters() if p.requires_grad]
    if c.peft:
        adapters = [p for n, p in trained.named_parameters() if p.requires_grad and "lora_" in n]
        rest = [p for n, p in trained.named_parameters() if p.requires_grad and "lora_" not in n]
        groups = [{"params": adapters, "lr": c.adapter_learning_rate}, {"params": rest, "lr": c.learning_rate}]
    else:
        groups = [{"params": params, "lr": c.learning_rate}]
    optimizer = torch.optim.AdamW(groups, weight_decay=c.weight_decay)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    teacher_model = teacher.model.to(device).eval() if teacher is not None else None
    record = ItemTrainingLog(device=str(device), positions=int(positions.shape[0]), pool_hit_rate=hit, peft=c.peft,
                             teacher=teacher_name, trainable_parameters=int(sum(p.numel() for p in params)))
    max_history = ranker.config.max_history

    def evaluate() -> dict[str, float]:
        if len(validation) == 0:
            return {"ndcg": float("nan")}
        with torch_threads(c.threads):
            scores = model_scores(trained, validation.histories, validation.candidates, max_history, device)
        return {"ndcg": reranked_ndcg(scores, validation.target_col, validation.n_users)}

    record.retrieval_metric = validation.retrieval_ndcg
    record.val_hit_rate = len(validation) / max(validation.n_users, 1)
    best_state = {k: v.detach().clone() for k, v in trained.state_dict().items()}
    best, best_step, bad, losses, kls, train_time = -1.0, 0, 0, [], [], 0.0
    bar = tqdm(range(c.max_steps), desc="item-token reranker" if teacher is None else "distill",
               disable=not c.progress, unit="step")
    with torch_threads(c.threads):
        for step in bar:
            tick = time.perf_counter()
            scale = _schedule(step, c)
            for group, lr in zip(optimizer.param_groups, base_lrs):
                group["lr"] = lr * scale
            histories, lists = batches.next()
            rows, mask = history_tensor(histories, max_history)
            rows, mask, cands = rows.to(device), mask.to(device), torch.as_tensor(lists).to(device)
            logits = trained(rows, mask, cands)
            target = torch.zeros(lists.shape[0], dtype=torch.long, device=device)
            loss = F.cross_entropy(logits, target)
            if teacher_model is not None:
                with torch.no_grad():
                    teacher_logits = teacher_model(rows, mask, cands)
                t = c.distill_temperature
                kl = F.kl_div(F.log_softmax(logits / t, -1), F.softmax(teacher_logits / t, -1),
                              reduction="batchmean") * t * t
                kls.append(kl.item())
                loss = loss + c.distill_weight * kl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if c.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, c.grad_clip)
            optimizer.step()
            losses.append(loss.item())
            train_time += time.perf_counter() - tick
            record.steps = step + 1
            if (step + 1) % c.eval_every == 0 or step + 1 == c.max_steps:
                metrics = evaluate()
                entry = {"step": step + 1, "loss": float(np.mean(losses)), "metric": metrics["ndcg"],
                         "epoch": round(batches.drawn / positions.shape[0], 3),
                         "seconds": round(time.perf_counter() - started, 1)}
                if kls:
                    entry["kl"] = float(np.mean(kls))
                record.history.append(entry)
                log.info("step %d: %s", step + 1, entry)
                bar.set_postfix(loss=f"{entry['loss']:.3f}", val=f"{metrics['ndcg']:.4f}")
                losses, kls = [], []
                if not np.isnan(metrics["ndcg"]) and metrics["ndcg"] > best:
                    best, best_step, bad = metrics["ndcg"], step + 1, 0
                    best_state = {k: v.detach().clone() for k, v in trained.state_dict().items()}
                else:
                    bad += 1
                    if c.patience and bad >= c.patience:
                        record.stopped_early = True
                        break
    if best >= 0:
        trained.load_state_dict(best_state)
    else:
        best_step = record.steps
    model = merge_adapters(trained) if c.peft else trained
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    ranker.model = model.to("cpu").eval()
    ranker.backend = type(ranker.backend)(ranker.model, "torch", ranker.config.threads)
    ranker.clear_cache()
    record.best_step, record.best_metric = best_step, best if best >= 0 else float("nan")
    record.seconds = time.perf_counter() - started
    record.train_seconds = train_time
    record.n_train_lists = batches.drawn
    record.lists_per_s = batches.drawn / max(train_time, 1e-9)
    record.epochs = batches.drawn / positions.shape[0]
    ranker.meta["training"] = record.to_dict()
    ranker.meta["trainer"] = c.to_dict()
    ranker.meta["history_fingerprint"] = split.history("val").fingerprint()
    ranker.meta["protocol"] = split.kind
    return record


def student_from(teacher: ItemTokenRanker, layers: tuple[int, ...], ffn_width: int | None = None) -> ItemTokenRanker:
    """A student ranker: a copy of ``teacher`` (item inputs, embeddings, head) keeping only the encoder
    layers ``layers`` (indexes into the teacher's), each with its feed-forward block pruned to ``ffn_width``
    neurons (default: unpruned), the ones with the largest ``|w_in| * |w_out|``
    (:func:`ranking.student.ffn_keep`, the title students' rule); ready for :func:`distill_item_ranker`."""
    from ranking.student import ffn_keep

    count = len(teacher.model.bert.encoder.layer)
    if not layers or any(not 0 <= i < count for i in layers) or list(layers) != sorted(set(layers)):
        raise ConfigError(f"layers must be distinct increasing indexes in [0, {count}), got {list(layers)}")
    width = int(teacher.encoder_config.get("intermediate_size", teacher.model.bert.config.intermediate_size))
    ffn_width = width if ffn_width is None else ffn_width
    if isinstance(ffn_width, bool) or not isinstance(ffn_width, int) or not 1 <= ffn_width <= width:
        raise ConfigError(f"ffn_width must be an integer in [1, {width}] (the teacher's), got {ffn_width!r}")
    model = copy.deepcopy(teacher.model)
    model.bert.encoder.layer = torch.nn.ModuleList([model.bert.encoder.layer[i] for i in layers])
    model.bert.config.num_hidden_layers = len(layers)
    if ffn_width < width:
        with torch.no_grad():
            for layer in model.bert.encoder.layer:
                keep = ffn_keep(layer.intermediate.dense.weight, layer.output.dense.weight, ffn_width)
                inner, outer = layer.intermediate.dense, layer.output.dense
                pruned_in = torch.nn.Linear(inner.in_features, ffn_width)
                pruned_in.weight.copy_(inner.weight[keep])
                pruned_in.bias.copy_(inner.bias[keep])
                pruned_out = torch.nn.Linear(ffn_width, outer.out_features)
                pruned_out.weight.copy_(outer.weight[:, keep])
                pruned_out.bias.copy_(outer.bias)
                layer.intermediate.dense, layer.output.dense = pruned_in, pruned_out
        model.bert.config.intermediate_size = ffn_width
    encoder_config = {**teacher.encoder_config, "num_hidden_layers": len(layers), "intermediate_size": ffn_width}
    config = dataclasses.replace(teacher.config, layers=len(layers), ffn=ffn_width)
    meta = {"teacher_layers": list(layers), "ffn_width": ffn_width}
    return ItemTokenRanker(model, teacher.items, config, encoder_config=encoder_config,
                           genre_names=teacher.genre_names, meta=meta)


def distill_item_ranker(teacher: ItemTokenRanker, split: Split, retriever: Any, layers: tuple[int, ...],
                        config: ItemTrainerConfig | None = None, *, teacher_name: str = "teacher",
                        ffn_width: int | None = None) -> tuple[ItemTokenRanker, ItemTrainingLog]:
    """A student with the teacher's ``layers`` (feed-forward blocks pruned to ``ffn_width``), trained on the
    teacher's scores plus the ground truth over the same lists (``config.distill_weight``,
    ``distill_temperature``); the best validation NDCG@10 is kept."""
    student = student_from(teacher, layers, ffn_width)
    record = train_item_ranker(student, split, retriever, config, teacher=teacher, teacher_name=teacher_name)
    student.meta["teacher"] = {"name": teacher_name, "layers": list(layers), "ffn_width": student.config.ffn,
                               "teacher_val_ndcg@10": teacher.meta.get("training", {}).get("best_metric")}
    return student, record


#: Shortlist sizes the hybrid head is fitted for; validation picks one (see :func:`fit_hybrid_head`).
HEAD_MS = (20, 50, 100)


def fit_hybrid_head(ranker: ItemTokenRanker, retriever: Any, split: Split, ms: int | tuple[int, ...] = HEAD_MS,
                    blend_config: Any = None, covisit: Any = True, served: Any = None) -> Any:
    """Fit the hybrid head on validation lists and set it on ``ranker``; returns the chosen
    :class:`~ranking.blend.HybridBlend`.

    For each shortlist size M in ``ms``, and with and without the co-visitation feature (``"covisit"``,
    :mod:`retrieval.covisit`), a head is fitted on the retriever's top M of every validation target (targets
    inside; the model never trained on them) and cross-validated against the retrieval order. The served
    head is the one with the largest cross-validated gain among those that beat the retrieval order; when
    none does, the ranker carries the M=50 (or first) head without co-visitation and with ``use_blend``
    False, and the recommender serves the retrieval order without running the reranker. The chosen M is
    ``blend.report["m"]`` (the depth the recommender reranks, :attr:`~ranking.item_ranker.ItemTokenRanker.head_m`);
    every candidate's cross-validation is kept in ``blend.report["by_m"]``.

    ``covisit``: ``True`` fits the co-visitation counts on ``split.history("val")`` (the events the ranker
    trained on) and sets them on the ranker (``ranker.covisit``); a
    :class:`~retrieval.covisit.CovisitConfig` does so with that config; ``False`` tries heads without it only.

    ``served``: the retriever whose own list a user gets when the reranker does not run, when that is not
    ``retriever``'s order (the hybrid, whose candidate view ``retriever`` is: its served fusion is tuned for
    NDCG@10, its candidates for recall). A head must then also beat that list's validation NDCG@10
    (``report["served_ndcg@10"]``), or the recommender keeps the served list: a reranker that makes the list
    worse than retrieval alone is not served. It must hold ``split.history("val")``.
    """
    from ranking.blend import HybridBlend
    from ranking.config import BlendConfig
    from retrieval.covisit import Covisitation, CovisitConfig

    ms = (ms,) if isinstance(ms, int) else tuple(ms)
    if not ms or any(m < 2 for m in ms):
        raise ConfigError(f"fit_hybrid_head: ms must be shortlist sizes >= 2, got {ms!r}")
    base = blend_config or BlendConfig()
    configs = {"": base}
    if covisit is not False and covisit is not None:
        history = split.history("val")
        config = covisit if isinstance(covisit, CovisitConfig) else CovisitConfig()
        current = ranker.covisit
        if current is None or current.fingerprint != history.fingerprint() or current.config != config:
            ranker.covisit = Covisitation(config).fit(history, ranker.items)
        if "covisit" not in base.features:
            configs["+covisit"] = dataclasses.replace(base, features=(*base.features, "covisit"))
    deepest, retrieval_scores = validation_set(retriever, split, ranker.items, max(ms))
    histories = [ranker.items.external(h) for h in deepest.histories]
    ids = np.where(deepest.candidates >= 0, ranker.items.ids[np.maximum(deepest.candidates, 0)], -1)
    scores = ranker.score_lists(histories, ids)
    covisit_scores = ranker.covisit.score_lists(histories, ids) if ranker.covisit is not None else None
    heads, by_m = {}, {}
    for m in ms:
        inside = np.flatnonzero(deepest.target_col < m)
        for suffix, config in configs.items():
            extra = {"covisit": covisit_scores[inside, :m]} if "covisit" in config.features else None
            blend = HybridBlend(config).fit(scores[inside, :m], retrieval_scores[inside, :m],
                                            deepest.target_col[inside], n_users=deepest.n_users, extra=extra)
            blend.report["m"] = m
            heads[f"{m}{suffix}"] = blend
            by_m[f"{m}{suffix}"] = {k: blend.report[k] for k in ("cv_ndcg@10_blend", "cv_ndcg@10_retrieval", "lists",
                                                                 "use_blend")}
    served_ndcg = None
    if served is not None and served is not retriever:
        served_ndcg = float(validation_set(served, split, ranker.items, 10)[0].retrieval_ndcg)
        for key, head in heads.items():
            by_m[key]["beats_served"] = bool(head.report["cv_ndcg@10_blend"] > served_ndcg)
    winners = [key for key, head in heads.items()
               if head.use_blend and (served_ndcg is None or head.report["cv_ndcg@10_blend"] > served_ndcg)]
    if winners:
        chosen = max(winners, key=lambda key: heads[key].report["cv_ndcg@10_blend"] - heads[key].report[
            "cv_ndcg@10_retrieval"])
    else:
        chosen = "50" if 50 in ms else str(ms[0])
    blend = heads[chosen]
    blend.report["by_m"] = by_m
    if served_ndcg is not None:
        blend.report["served_ndcg@10"] = served_ndcg
        if not winners and blend.use_blend:  # beat the candidate order, not the served list
            blend.use_blend = False
            blend.report["use_blend"] = False
    ranker.set_hybrid_head(blend)
    return blend


__all__ = ["HEAD_MS", "ItemTrainingLog", "distill_item_ranker", "fit_hybrid_head", "model_scores", "stage_candidates",
           "student_from", "train_item_ranker", "validation_set"]
