"""Distilling a trained cross-encoder ranker into a fewer-layer student (:mod:`ranking.student`).

**Distillation** (:func:`distill`, :func:`distill_lists`): every weight of the student is trained on
lists drawn like the reranker's training lists (:func:`ranking.data.sample_lists`: the held-out-like
positive plus hard negatives from the retriever's top ``hard_pool``) with

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, positive)

where the teacher scores the same lists in the student's mode under ``torch.inference_mode`` with its own
tokens. Early stopping keeps the weights closest to the teacher on the validation lists (lowest KL at
T=1; ``select="ndcg"``: the best validation NDCG@10 of the reranked top-M, :func:`ranking.data.reranked_ndcg`,
which on ~120 scored ml-latest-small lists moves by +-0.005 from noise alone and picked step 50 of 300 in
both 2-layer runs while the KL kept falling); both are logged with the teacher's NDCG@10, and the
returned student's meta holds ``distill`` (the log), ``distill_config`` and ``quality``. Save it with
:func:`ranking.student.save_student` (which adds the probe check) and check it with
:func:`ranking.student.verify_student`; both, and :func:`~ranking.student.make_student`, are re-exported
here.

``python -m ranking.distill --teacher artifacts/rerank/two_tower-one_pass --layers 2 --item-tokens 8
--ffn-width 512 --steps 600 --learning-rate 3e-4 --eval-every 100 --out artifacts/rerank/student-2l`` builds
the served student (:func:`~ranking.student.default_layers`; candidate text cut to 8 tokens; feed-forward
blocks pruned to 512 of 1536 neurons), distils it on ml-latest-small (two-tower candidates from
``artifacts/rerank/retriever-two_tower``, fitted when missing) and saves it: about 10 minutes on 2 cores
(its validation KL was lowest at step 200 and rose after, so patience stopped it at 500). The defaults
(300 steps at 1e-4) take about 6 minutes (a pairwise teacher gets a fifth of the steps, each ~5x dearer).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from data.config import JsonConfig, require
from data.errors import ArtifactError, ConfigError, DataValidationError
from data.protocol import Split
from ranking.backends import TorchBackend
from ranking.config import TrainerConfig
from ranking.cross_encoder import CrossEncoderRanker
from ranking.data import (
    ListBatches,
    ListTrainingLog,
    ValidationLists,
    reranked_ndcg,
    retrieval_rows,
    user_sequences,
    validation_lists,
)
from ranking.encoder import CrossEncoder
from ranking.scoring import score_lists
from ranking.student import (
    check_layers,
    default_layers,
    make_student,
    save_student,
    teacher_layers,
    verify_student,
)
from ranking.trainer import list_scores, resolve_device, seed_everything
from retrieval.trainer import torch_threads

log = logging.getLogger(__name__)

__all__ = ["DistillConfig", "DistillLog", "default_layers", "distill", "distill_lists", "make_student",
           "ranking_kl", "save_student", "verify_student"]


# ---- distillation ---------------------------------------------------------------------------------
@dataclass
class DistillConfig(JsonConfig):
    """Training a student on its teacher's scores (see the module docstring).

    Attributes:
        steps: most optimizer steps.
        batch_size: lists per step.
        list_size: candidates per list: the positive and ``list_size - 1`` negatives.
        hard_fraction: share of negatives drawn from the retriever's top ``hard_pool`` (the rest uniform
            from the catalogue); the teacher's knowledge is in how it orders hard candidates.
        hard_pool: how deep in each user's retrieval list negatives are drawn from (the reranked depth).
        positions_per_user: training positions sampled per user and pass over the users.
        min_history: fewest history items a training list needs.
        position_weighting: ``"uniform"`` or ``"linear"`` (position ``t`` drawn with weight ``t``: recent
            positions more often, like the held-out items).
        max_users: users sampled for training (0: all).
        temperature: T of the softened teacher and student distributions in the KL term.
        alpha: weight of the KL term; ``1 - alpha`` weighs the listwise softmax cross-entropy of the true
            positive.
        learning_rate: AdamW learning rate of every student weight.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up of the learning rate (then linear decay to 5%).
        grad_clip: gradient-norm clip; 0 disables.
        eval_every: steps between validation evaluations.
        patience: evaluations without a better validation score (``select``) before stopping.
        select: what "better" means for early stopping and the kept weights: ``"val_kl"`` (lower KL from
            the teacher's validation scores: fidelity, the student's job, and a far steadier signal than
            NDCG@10 on a few hundred lists) or ``"ndcg"`` (higher validation NDCG@10).
        val_candidates: retrieval depth reranked during validation (M).
        val_users: validation users (0: all); only those whose target is in the top M are scored, the rest
            count 0 (exactly NDCG@10 over all of them).
        eval_at_start: evaluate the untrained student too, so early stopping can keep the copied weights.
        seed: seeds sampling, dropout and everything random.
        threads: ``torch.set_num_threads`` while distilling.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"`` (teacher and student both run there).
        progress: tqdm progress bar.
    """

    steps: int = 300
    batch_size: int = 8
    list_size: int = 16
    hard_fraction: float = 1.0
    hard_pool: int = 100
    positions_per_user: int = 4
    min_history: int = 3
    position_weighting: str = "linear"
    max_users: int = 0
    temperature: float = 2.0
    alpha: float = 0.5
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 20
    grad_clip: float = 1.0
    eval_every: int = 50
    patience: int = 3
    select: str = "val_kl"
    val_candidates: int = 20
    val_users: int = 0
    eval_at_start: bool = True
    seed: int = 0
    threads: int = 2
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "hard_pool", "positions_per_user", "min_history", "eval_every",
                     "patience", "val_candidates", "threads"):
            value = getattr(self, name)
            require(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                    f"DistillConfig.{name} must be an integer >= 1, got {value!r}")
        require(isinstance(self.list_size, int) and self.list_size >= 2,
                f"DistillConfig.list_size must be an integer >= 2 (a positive and a negative), got {self.list_size!r}")
        require(0 <= self.hard_fraction <= 1, f"DistillConfig.hard_fraction must be in [0, 1], got {self.hard_fraction}")
        require(self.temperature > 0, f"DistillConfig.temperature must be > 0, got {self.temperature}")
        require(0 <= self.alpha <= 1, f"DistillConfig.alpha must be in [0, 1], got {self.alpha}")
        require(self.learning_rate > 0, f"DistillConfig.learning_rate must be > 0, got {self.learning_rate}")
        require(self.weight_decay >= 0 and self.grad_clip >= 0 and self.warmup_steps >= 0,
                "DistillConfig.weight_decay, grad_clip and warmup_steps must be >= 0")
        require(self.position_weighting in ("uniform", "linear"),
                f"DistillConfig.position_weighting must be 'uniform' or 'linear', got {self.position_weighting!r}")
        require(self.select in ("val_kl", "ndcg"),
                f"DistillConfig.select must be 'val_kl' or 'ndcg', got {self.select!r}")
        require(self.max_users >= 0 and self.val_users >= 0, "DistillConfig.max_users and val_users must be >= 0")
        require(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
                f"DistillConfig.device must be 'auto', 'cpu' or 'cuda[:n]', got {self.device!r}")

    def sampling(self) -> TrainerConfig:
        """The list-sampling fields as the :class:`TrainerConfig` that :func:`sample_lists` reads."""
        return TrainerConfig(n_negatives=self.list_size - 1, hard_fraction=self.hard_fraction,
                             hard_pool=self.hard_pool, positions_per_user=self.positions_per_user,
                             min_history=self.min_history, position_weighting=self.position_weighting)


@dataclass
class DistillLog(ListTrainingLog):
    """What a distillation run did: :class:`~ranking.data.ListTrainingLog` (``best_metric`` is the student's
    validation NDCG@10 at ``best_step``, the step chosen by ``DistillConfig.select``; ``history`` also
    records ``kl``, ``ce`` and ``val_kl``) plus:

    Attributes:
        start_metric: the untrained student's validation NDCG@10 (``eval_at_start``).
        teacher_metric: the teacher's validation NDCG@10 on the same lists, in the student's mode.
        val_kl: validation KL(teacher || student) at T=1 at ``best_step`` (``nan`` without validation).
    """

    start_metric: float = float("nan")
    teacher_metric: float = float("nan")
    val_kl: float = float("nan")


def ranking_kl(teacher: np.ndarray, student: np.ndarray, temperature: float = 1.0) -> float:
    """Mean over lists of KL(softmax(teacher / T) || softmax(student / T)) over the finite entries of
    ``(n, M)`` score arrays (``-inf`` pads, the same in both); 0 for no lists."""
    teacher = np.asarray(teacher, dtype=np.float64) / temperature
    student = np.asarray(student, dtype=np.float64) / temperature
    if teacher.shape != student.shape:
        raise DataValidationError(f"ranking_kl: shapes differ {teacher.shape} vs {student.shape}")
    valid = np.isfinite(teacher) & np.isfinite(student)
    if teacher.size == 0 or not valid.any():
        return 0.0

    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = np.where(valid, x, -np.inf)
        top = np.max(np.where(valid, x, -np.inf), axis=1, keepdims=True)
        top = np.where(np.isfinite(top), top, 0.0)
        shifted = x - top
        return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))

    with np.errstate(invalid="ignore"):  # -inf - -inf on padding, masked out
        log_p, log_q = log_softmax(teacher), log_softmax(student)
        terms = np.where(valid, np.exp(log_p) * (log_p - log_q), 0.0)
    rows = valid.any(axis=1)
    return float(terms.sum(axis=1)[rows].mean())


def _scores(model: CrossEncoder, ranker: CrossEncoderRanker, mode: str, validation: ValidationLists,
            device: torch.device) -> np.ndarray:
    return score_lists(TorchBackend(model, device), ranker.tokens, mode, validation.histories,
                       validation.candidates, batch_size=ranker.config.batch_size)


def distill_lists(teacher: CrossEncoderRanker, student: CrossEncoderRanker, seqs: list[np.ndarray],
                  pools: np.ndarray, validation: ValidationLists | None, config: DistillConfig | None = None,
                  ) -> tuple[CrossEncoderRanker, DistillLog]:
    """Distil ``teacher`` into ``student`` on lists sampled from ``seqs`` and ``pools``; see the module
    docstring. The student's model is trained in place; returns a ranker over it (best weights, eval mode,
    CPU) with the log and config in its meta, and the log.

    Args:
        teacher: the trained ranker (not changed; it scores in the student's mode).
        student: from :func:`make_student` (or any ranker over the same catalogue).
        seqs: per user row, training item rows in time order.
        pools: ``(n_users, K)`` retrieval item rows per user row (``-1`` pads): the hard negatives.
        validation: lists for early stopping (``None``: run ``steps`` and keep the last weights).
        config: the distillation config.
    """
    c = config or DistillConfig()
    if teacher.items != student.items:
        raise DataValidationError("distill: teacher and student rank different catalogues; build the student "
                                  "with make_student(teacher, ...)")
    if pools.shape[0] != len(seqs):
        raise DataValidationError(f"distill: pools has {pools.shape[0]} rows but there are {len(seqs)} user "
                                  "sequences; pass one pool row per user row")
    device = resolve_device(c.device)
    seed_everything(c.seed)
    rng = np.random.default_rng(c.seed)
    sampling = c.sampling()
    users = np.arange(len(seqs))
    users = users[np.array([s.size > c.min_history for s in seqs], dtype=bool)] if len(seqs) else users
    if c.max_users and users.size > c.max_users:
        users = np.sort(rng.choice(users, size=c.max_users, replace=False))
    if users.size == 0:
        raise DataValidationError(f"distill: no user has more than min_history={c.min_history} training items")
    mode = student.mode
    teacher_model = teacher.model.to(device).eval()
    model = student.model.to(device)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=c.learning_rate, weight_decay=c.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, c.warmup_steps)) * max(0.05, 1 - s / c.steps))
    record = DistillLog(device=str(device))
    t = float(c.temperature)
    started = time.perf_counter()
    best_state: dict[str, torch.Tensor] | None = None
    teacher_val = None
    bad = 0

    def evaluate(step: int, losses: dict[str, list[float]]) -> bool:
        """Score the validation lists; keep the best weights; True when patience ran out."""
        nonlocal best_state, bad
        student_val = _scores(model, student, mode, validation, device)
        metric = reranked_ndcg(student_val, validation.target_col, validation.n_users)
        kl = ranking_kl(teacher_val, student_val)
        means = {k: round(float(np.mean(v)), 5) if v else float("nan") for k, v in losses.items()}
        record.history.append({"step": step, **means, "metric": round(metric, 6), "val_kl": round(kl, 6),
                               "seconds": round(time.perf_counter() - started, 1)})
        if step == 0:
            record.start_metric = metric
        if c.select == "val_kl":
            better = math.isnan(record.val_kl) or kl < record.val_kl
        else:
            better = math.isnan(record.best_metric) or metric > record.best_metric
        if better:
            record.best_metric, record.best_step, record.val_kl = metric, step, kl
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            bad = 0
            return False
        bad += 1
        return bad >= c.patience

    batches = ListBatches(seqs, pools, len(student.items), sampling, rng, users, c.batch_size)
    losses: dict[str, list[float]] = {"loss": [], "kl": [], "ce": []}
    with torch_threads(c.threads):
        if validation is not None:
            record.retrieval_metric = validation.retrieval_ndcg
            teacher_val = _scores(teacher_model, teacher, mode, validation, device)
            record.teacher_metric = reranked_ndcg(teacher_val, validation.target_col, validation.n_users)
            if c.eval_at_start:
                evaluate(0, {k: [] for k in losses})
        bar = tqdm(range(1, c.steps + 1), desc=f"distill-{mode}-{teacher_layers(student)}L", unit="step",
                   disable=not c.progress)
        model.train()
        for step in bar:
            tick = time.perf_counter()
            histories, items = batches.next()
            record.n_train_lists = batches.drawn
            with torch.inference_mode():
                target = list_scores(teacher_model, mode, histories, items, teacher, device).float()
            target = target.clone()  # an ordinary tensor (inference tensors cannot enter autograd)
            scores = list_scores(model, mode, histories, items, student, device)
            kl = F.kl_div(F.log_softmax(scores / t, dim=1), F.log_softmax(target / t, dim=1), log_target=True,
                          reduction="batchmean") * (t * t)
            ce = F.cross_entropy(scores, torch.zeros(scores.shape[0], dtype=torch.long, device=device))
            loss = c.alpha * kl + (1 - c.alpha) * ce
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if c.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
            optimizer.step()
            schedule.step()
            for name, value in (("loss", loss), ("kl", kl), ("ce", ce)):
                losses[name].append(float(value.detach()))
            record.train_seconds += time.perf_counter() - tick
            record.steps = step
            if validation is not None and (step % c.eval_every == 0 or step == c.steps):
                stop = evaluate(step, losses)
                model.train()
                bar.set_postfix(loss=f"{np.mean(losses['loss']):.3f}", ndcg=f"{record.history[-1]['metric']:.4f}")
                losses = {k: [] for k in losses}
                if stop:
                    record.stopped_early = True
                    break
            elif step % 10 == 0:
                bar.set_postfix(loss=f"{np.mean(losses['loss'][-10:]):.3f}")
        if best_state is not None:
            model.load_state_dict(best_state)
        else:
            record.best_step = record.steps
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    record.seconds = time.perf_counter() - started
    record.lists_per_s = record.steps * c.batch_size / max(record.train_seconds, 1e-9)
    meta = {**student.meta, "distill": record.to_dict(), "distill_config": c.to_dict(),
            "quality": {"student_val_ndcg@10": record.best_metric, "teacher_val_ndcg@10": record.teacher_metric,
                        "retrieval_val_ndcg@10": record.retrieval_metric, "start_val_ndcg@10": record.start_metric,
                        "val_lists": len(validation) if validation is not None else 0,
                        "val_users": validation.n_users if validation is not None else 0}}
    trained = CrossEncoderRanker(model.to("cpu"), student.tokens, student.config, encoder_config=student.encoder_config,
                                 tokenizer=student.tokenizer, meta=meta)
    teacher.model.to("cpu")
    return trained, record


def distill(teacher: CrossEncoderRanker, student: CrossEncoderRanker, split: Split, retriever: Any,
            config: DistillConfig | None = None) -> tuple[CrossEncoderRanker, DistillLog]:
    """Distil on a protocol split: training lists from ``split.train`` with hard negatives from
    ``retriever``'s top ``hard_pool``, early stopping on the validation users' reranked top
    ``val_candidates``. ``retriever`` must be fitted on ``split.history("val")``. Returns the trained
    student (histories set to the training events) and the log."""
    c = config or DistillConfig()
    if student.items != split.items:
        raise DataValidationError("distill: the student's catalogue is not split.items; build the teacher and the "
                                  "student over the split's items")
    users = split.users
    seqs = user_sequences(split.train, users, split.items)
    pools = retrieval_rows(retriever, users.ids, c.hard_pool, split.items)
    val = split.targets("val")
    if c.val_users and len(val) > c.val_users:
        val = val.sample(n=c.val_users, random_state=c.seed)
    candidates = retrieval_rows(retriever, val["user_id"].to_numpy(), c.val_candidates, split.items)
    targets = split.items.rows(val["item_id"].to_numpy(), missing="ignore")
    validation = validation_lists([seqs[u] for u in users.rows(val["user_id"].to_numpy())], candidates, targets)
    log.info("distill validation: %d of %d users have the target in the top %d", len(validation),
             validation.n_users, c.val_candidates)
    trained, record = distill_lists(teacher, student, seqs, pools, validation, c)
    trained.set_history(split.train)
    return trained, record


# ---- command line ---------------------------------------------------------------------------------
def val_retriever(split: Split, folder: str | Path) -> Any:
    """The two-tower retriever fitted on ``split.history("val")``: loaded from ``folder`` when it exists and
    was fitted on that history, else fitted (and saved there when the folder does not exist)."""
    from ranking.data import stage_retriever
    from retrieval.registry import load_retriever

    folder = Path(folder)
    expected = split.history("val").fingerprint()
    if folder.is_dir():
        try:
            model = load_retriever(folder)
            if model.history_fingerprint == expected:
                return model
            log.warning("%s was fitted on other events; fitting a new two-tower retriever", folder)
        except ArtifactError as exc:
            log.warning("ignoring %s: %s", folder, exc)
    model = stage_retriever("two_tower", split, "val")
    if not folder.exists():
        model.save(folder)
    return model


def parse_layers(value: str, n_teacher: int) -> tuple[int, ...]:
    """``"2"`` -> :func:`default_layers` ``(n_teacher, 2)``; ``"0,5"`` -> ``(0, 5)``."""
    try:
        if "," in value:
            return check_layers([int(v) for v in value.split(",") if v.strip()], n_teacher)
        return default_layers(n_teacher, int(value))
    except ValueError as exc:
        raise ConfigError(f"--layers must be a count ('2') or comma-separated teacher layers ('2,5'), got "
                          f"{value!r} ({exc})") from exc


def main(argv: list[str] | None = None) -> None:
    """Distil a saved teacher into a fewer-layer student on ml-latest-small and save it."""
    parser = argparse.ArgumentParser(description="Distil a cross-encoder ranker into a fewer-layer student.")
    parser.add_argument("--teacher", default="artifacts/rerank/two_tower-one_pass", help="teacher ranker folder")
    parser.add_argument("--layers", default="2", help="student layer count ('2': default_layers) or indices ('2,5')")
    parser.add_argument("--out", required=True, help="folder to save the student to")
    parser.add_argument("--retriever", default="artifacts/rerank/retriever-two_tower",
                        help="two-tower retriever folder (fitted on the training events; fitted when missing)")
    parser.add_argument("--data-path", default=None, help="folder with ml-latest-small (else SHORTLIST_DATA_DIR)")
    parser.add_argument("--config", default=None, help="DistillConfig JSON file (fields override defaults)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: DistillConfig's, "
                        "a fifth of it for a pairwise teacher: about 5 minutes on 2 cores either way)")
    parser.add_argument("--learning-rate", type=float, default=None, help="AdamW learning rate (default: "
                        "DistillConfig's 1e-4)")
    parser.add_argument("--eval-every", type=int, default=None, help="steps between validations (default: "
                        "DistillConfig's 50)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: DistillConfig's 2; "
                        "1 is faster when another job holds a core)")
    parser.add_argument("--item-tokens", type=int, default=None, help="student's candidate text budget")
    parser.add_argument("--history-tokens", type=int, default=None, help="student's history text budget")
    parser.add_argument("--ffn-width", type=int, default=None,
                        help="prune each student layer's feed-forward block to this many neurons (default: keep all)")
    parser.add_argument("--device", default=None, help="cpu, cuda or auto")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from data.movielens import load_movielens
    from data.protocol import apply_filters, leave_one_out

    teacher = CrossEncoderRanker.load(args.teacher)
    config = DistillConfig.load(args.config) if args.config else DistillConfig()
    steps = args.steps or (config.steps if args.config or teacher.mode == "one_pass" else max(1, config.steps // 5))
    overrides = {k: v for k, v in (("steps", steps), ("device", args.device), ("threads", args.threads),
                                   ("learning_rate", args.learning_rate), ("eval_every", args.eval_every))
                 if v is not None}
    config = DistillConfig.from_dict({**config.to_dict(), **overrides})
    text = teacher.config.text
    if args.item_tokens or args.history_tokens:
        text = dataclasses.replace(text, item_tokens=args.item_tokens or text.item_tokens,
                                   history_tokens=args.history_tokens or text.history_tokens)
    raw = load_movielens("ml-latest-small", args.data_path)
    split = leave_one_out(apply_filters(raw))
    retriever = val_retriever(split, args.retriever)
    layers = parse_layers(args.layers, teacher_layers(teacher))
    student = make_student(teacher, layers, text, raw.items if text != teacher.config.text else None,
                           teacher_folder=args.teacher, ffn_width=args.ffn_width)
    trained, record = distill(teacher, student, split, retriever, config)
    metrics = {"val_ndcg@10": record.best_metric, "teacher_val_ndcg@10": record.teacher_metric,
               "train_fingerprint": split.history("val").fingerprint(), "retriever": "two_tower",
               "train_seconds": round(record.seconds, 1)}
    save_student(trained, args.out, metrics=metrics)
    verify_student(args.out)
    width = f", FFN width {args.ffn_width}" if args.ffn_width else ""
    print(f"saved {args.out}: layers {list(layers)} of {teacher_layers(teacher)}{width}, validation NDCG@10 "
          f"{record.best_metric:.4f} (teacher {record.teacher_metric:.4f}, start {record.start_metric:.4f}, "
          f"retrieval {record.retrieval_metric:.4f}) at step {record.best_step}, {record.seconds:.0f} s")


if __name__ == "__main__":
    main()
