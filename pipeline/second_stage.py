"""Training the second stage end to end: the item-token teacher, its distilled student and their hybrid
heads, on a split under a protocol, with the candidates of the cached first-stage retriever.

    python -m pipeline.second_stage [--protocol leave_one_out|last_n] [--steps 14000] [--student-steps 1500]
                                    [--student-layers 0 1] [--student-ffn 128] [--hard-horizon 30]
                                    [--out artifacts/rerank] [--threads 2] [--heads-only]

writes, under ``OUT/<protocol>/``:

* ``retriever-two_tower/``: the candidate retriever fitted on the training events (reused while its data
  fingerprint matches; :func:`pipeline.stages.candidate_retriever`);
* ``item-teacher/``: the item-token reranker trained on every training position, with its hybrid head;
* ``item-student/``: the student distilled from it (a subset of its layers, feed-forward blocks pruned),
  with its own hybrid head;
* ``served.json``: which of the two the recommender serves, chosen on validation (:func:`choose_served`:
  the student when it keeps ``student_keep`` of the teacher's validation gain, else the teacher).

The same as a function: :func:`train_second_stage`. A saved teacher whose training data and config match
is loaded instead of retrained (``retrain=True`` forces it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data.config import JsonConfig, require
from data.errors import ArtifactError, ConfigError
from data.io import atomic_write_json
from data.protocol import PROTOCOLS
from ranking.item_config import ItemTokenConfig, ItemTrainerConfig
from retrieval.covisit import CovisitConfig
from retrieval.fitting import config_settings
from retrieval.two_tower import TwoTowerConfig

log = logging.getLogger(__name__)

TEACHER_DIR, STUDENT_DIR, RETRIEVER_DIR, RANKERS_DIR = "item-teacher", "item-student", "retriever-two_tower", "rankers"
#: Names the ranker folder the recommender serves (:func:`choose_served`).
SERVED_FILE = "served.json"
#: The demo's short training (``shortlist train-ranker`` defaults): minutes on 2 cores, not the benchmark's hour.
DEMO_TRAINER = ItemTrainerConfig(max_steps=600, eval_every=150, warmup_steps=50)
DEMO_STUDENT = ItemTrainerConfig(max_steps=200, eval_every=100, learning_rate=1e-3, warmup_steps=20)


@dataclass
class SecondStageConfig(JsonConfig):
    """What :func:`train_second_stage` does.

    Attributes:
        dataset: the MovieLens dataset name.
        data_path: a folder holding it (``None``: ``$SHORTLIST_DATA_DIR`` or the download cache).
        protocol: ``"leave_one_out"`` (LlamaRec's) or ``"last_n"``.
        n: test cases per user under ``last_n``.
        retriever: the candidate retriever (``"two_tower"``).
        two_tower: the candidate two-tower's config (``None``: :class:`~retrieval.two_tower.TwoTowerConfig`'s
            defaults); a saved retriever is reused only when its config matches.
        model: the teacher's config.
        trainer: the teacher's training.
        student_layers: teacher layers the student keeps; empty skips distillation.
        student_ffn: feed-forward width of the student's layers (pruned from the teacher's, most important
            neurons kept); ``None``, or a width at or above the teacher's, keeps the teacher's width.
        student_trainer: the student's training (distillation).
        hybrid_ms: shortlist sizes the hybrid heads are fitted for; validation picks one per ranker
            (:func:`ranking.item_trainer.fit_hybrid_head`).
        covisit: the co-visitation counts the heads may read (validation decides whether they do);
            ``None`` fits heads without them.
        student_keep: share of the teacher's cross-validated gain over the retrieval order (on validation)
            the student must keep to be the served ranker; otherwise the teacher is served
            (:func:`choose_served`, written to ``SERVED_FILE``).
        out: root folder; everything goes under ``out/<protocol>/``.
        retrain: train even when a saved teacher matches.
        events: for :func:`train_second_stage` on an artifact trained with ``shortlist train --events``:
            the event log, if it moved (``None``: the path the artifact's manifest records).
    """

    dataset: str = "ml-latest-small"
    data_path: str | None = None
    protocol: str = "leave_one_out"
    n: int = 5
    retriever: str = "two_tower"
    two_tower: TwoTowerConfig | None = None
    model: ItemTokenConfig = field(default_factory=ItemTokenConfig)
    trainer: ItemTrainerConfig = field(default_factory=lambda: ItemTrainerConfig(max_steps=14000, eval_every=500))
    student_layers: tuple[int, ...] = (0, 1)
    student_ffn: int | None = 128
    student_trainer: ItemTrainerConfig = field(
        default_factory=lambda: ItemTrainerConfig(max_steps=1500, learning_rate=1e-3, warmup_steps=50))
    hybrid_ms: tuple[int, ...] = (20, 50, 100)
    covisit: CovisitConfig | None = field(default_factory=CovisitConfig)
    student_keep: float = 0.8
    out: str = "artifacts/rerank"
    retrain: bool = False
    events: str | None = None

    def __post_init__(self) -> None:
        require(self.protocol in PROTOCOLS, f"protocol must be one of {list(PROTOCOLS)}, got {self.protocol!r}")
        require(self.n >= 1 and len(self.hybrid_ms) > 0 and min(self.hybrid_ms) >= 2,
                "n must be >= 1 and hybrid_ms non-empty shortlist sizes >= 2")
        require(0.0 <= self.student_keep <= 1.0, f"student_keep must be in [0, 1], got {self.student_keep!r}")


@dataclass
class SecondStageResult:
    """Where things went and what they measured on validation."""

    folder: Path
    teacher: dict[str, Any]
    student: dict[str, Any] | None
    seconds: float
    served: dict[str, Any] | None = None


def candidate_identity(retriever: Any) -> dict[str, Any]:
    """What a ranker records of the retriever whose candidates it learned from (``meta["candidates"]``):
    its name, its config less the speed fields, and the history it was fitted on."""
    config = getattr(retriever, "config", None)
    return {"name": getattr(retriever, "name", type(retriever).__name__),
            "config": config_settings(config) if hasattr(config, "to_dict") else {},
            "history_fingerprint": getattr(retriever, "history_fingerprint", "")}


def learned_from(ranker: Any, retriever: Any, where: Any = "") -> bool:
    """Whether ``ranker`` learned from ``retriever``'s candidates: ``False`` when its recorded candidate
    retriever differs (another config or history: retrain it); a ranker saved before the record existed
    passes with a warning, since nothing says which retriever it learned from."""
    recorded = ranker.meta.get("candidates")
    if recorded is None:
        log.warning("%s does not record the retriever it learned from (saved before that record existed); "
                    "if the candidate retriever changed since, retrain it (python -m pipeline.second_stage "
                    "--retrain)", where)
        return True
    same = json.loads(json.dumps(recorded)) == json.loads(json.dumps(candidate_identity(retriever), default=str))
    if not same:
        log.warning("%s learned from other candidates than %s's (config or history differ); retraining",
                    where, getattr(retriever, "name", "the retriever"))
    return same


def _matches(folder: Path, split: Any, config: SecondStageConfig, candidates: Any) -> Any:
    from ranking.item_ranker import ItemTokenRanker

    if not (folder / "manifest.json").is_file():
        return None
    try:
        ranker = ItemTokenRanker.load(folder)
    except ArtifactError as exc:
        log.warning("cannot load %s (%s); retraining", folder, exc)
        return None
    try:
        saved = config_settings(ItemTrainerConfig.from_dict(ranker.meta.get("trainer") or {}))
    except ConfigError:
        return None
    wanted = config_settings(config.trainer)
    same = (ranker.meta.get("history_fingerprint") == split.history("val").fingerprint()
            and ranker.config == config.model and saved == wanted and learned_from(ranker, candidates, folder))
    return ranker if same else None


def fit_stage(split: Any, item_table: Any, candidates: Any, folder: Path, config: SecondStageConfig, *,
              serving: Any = None, served: Any = None, progress: bool = True) -> SecondStageResult:
    """The core: train (or load, when a matching one is saved) the teacher on ``candidates``' lists, distil
    the student, fit both hybrid heads and save both under ``folder``.

    ``candidates`` (holding ``split.history("val")``) gives the hard negatives and the validation lists;
    ``serving`` (default: the same) is the retriever whose lists the hybrid heads are fitted on: the one
    that will serve the candidates (e.g. a hybrid of which ``candidates`` is the two-tower component);
    ``served`` (default: ``serving``) is the retriever whose own list users get without a reranker, which a
    head must also beat on validation (``fit_hybrid_head``)."""
    from ranking.item_ranker import ItemTokenRanker
    from ranking.item_trainer import distill_item_ranker, fit_hybrid_head, train_item_ranker

    started = time.perf_counter()
    serving = serving if serving is not None else candidates
    trainer = dataclasses.replace(config.trainer, progress=config.trainer.progress and progress)
    teacher = None if config.retrain else _matches(folder / TEACHER_DIR, split, config, candidates)
    if teacher is None:
        teacher = ItemTokenRanker.build(item_table, split.items, config.model,
                                        item_vectors=candidates.item_embeddings(), seed=trainer.seed)
        record = train_item_ranker(teacher, split, candidates, trainer)
        log.info("teacher: %s", {k: v for k, v in record.to_dict().items() if k != "history"})
        teacher.meta["retriever"] = getattr(candidates, "name", config.retriever)
        teacher.meta["candidates"] = candidate_identity(candidates)
    else:
        log.info("teacher loaded from %s", folder / TEACHER_DIR)
    fit_hybrid_head(teacher, serving, split, config.hybrid_ms, covisit=config.covisit or False, served=served)
    teacher.meta["serving_retriever"] = getattr(serving, "name", type(serving).__name__)
    teacher.save(folder / TEACHER_DIR)
    out = {"folder": str(folder / TEACHER_DIR), "training": teacher.meta.get("training"),
           "hybrid_head": teacher.hybrid_head}
    student_out = None
    if config.student_layers:
        student_trainer = dataclasses.replace(config.student_trainer,
                                              progress=config.student_trainer.progress and progress)
        student, record = distill_item_ranker(teacher, split, candidates, tuple(config.student_layers),
                                              student_trainer, teacher_name=str(folder / TEACHER_DIR),
                                              ffn_width=student_width(teacher, config.student_ffn))
        fit_hybrid_head(student, serving, split, config.hybrid_ms, covisit=config.covisit or False, served=served)
        student.meta["retriever"] = teacher.meta.get("retriever")
        if "candidates" in teacher.meta:
            student.meta["candidates"] = teacher.meta["candidates"]
        student.meta["serving_retriever"] = teacher.meta["serving_retriever"]
        student.save(folder / STUDENT_DIR)
        student_out = {"folder": str(folder / STUDENT_DIR), "training": record.to_dict(),
                       "hybrid_head": student.hybrid_head}
    served = choose_served(teacher, student if config.student_layers else None, config.student_keep)
    atomic_write_json(folder / SERVED_FILE, served)
    log.info("served ranker: %s (%s)", served["served"], served["reason"])
    return SecondStageResult(folder, out, student_out, time.perf_counter() - started, served)


def train_second_stage(config: SecondStageConfig | None = None, *, raw: Any = None,
                       progress: bool = True) -> SecondStageResult:
    """Train (or load) the teacher, fit its hybrid head, distil the student, on ``config.protocol``'s split
    with the cached two-tower's candidates; see the module docstring."""
    config = config or SecondStageConfig()
    raw, split, folder, retriever = _protocol_stage(config, raw)
    return fit_stage(split, raw.items, retriever, folder, config, progress=progress)


def _protocol_stage(config: SecondStageConfig, raw: Any = None) -> tuple[Any, Any, Path, Any]:
    """``(raw events, split, OUT/<protocol> folder, candidate retriever)`` of ``config`` (the retriever
    loaded from the folder while it matches, else fitted and saved there)."""
    from pipeline.stages import candidate_retriever, protocol_split
    from pipeline.train import load_dataset

    raw = raw if raw is not None else load_dataset(config.dataset, config.data_path)
    split = protocol_split(raw, config.protocol, config.n)
    folder = Path(config.out) / config.protocol
    retriever = candidate_retriever(split, config.retriever, folder / RETRIEVER_DIR,
                                    threads=config.trainer.threads, config=config.two_tower)
    return raw, split, folder, retriever


def head_gain(ranker: Any) -> float:
    """The cross-validated NDCG@10 gain of ``ranker``'s hybrid head over what would be served without it on
    validation: the retrieval order it reranks, or the retriever's served list when that is better
    (``served_ndcg@10``, a hybrid's); 0 when it has no head or its head lost there (the retrieval order is
    then served)."""
    head = getattr(ranker, "hybrid_head", None) or {}
    report = head.get("report") or {}
    if not head.get("use_blend") or "cv_ndcg@10_blend" not in report:
        return 0.0
    bar = max(report["cv_ndcg@10_retrieval"], report.get("served_ndcg@10", float("-inf")))
    return float(report["cv_ndcg@10_blend"] - bar)


def choose_served(teacher: Any, student: Any | None, keep: float = 0.8) -> dict[str, Any]:
    """Which ranker the recommender serves, decided on validation: the student when it keeps at least
    ``keep`` of the teacher's cross-validated gain over the retrieval order (or the teacher gains nothing),
    else the teacher. Returns ``{"served": folder name, "reason", "teacher_gain", "student_gain", "keep"}``."""
    t_gain = head_gain(teacher)
    if student is None:
        return {"served": TEACHER_DIR, "reason": "no student", "teacher_gain": t_gain, "student_gain": None,
                "keep": keep}
    s_gain = head_gain(student)
    if t_gain <= 0 or s_gain >= keep * t_gain:
        reason = (f"the student keeps {s_gain / t_gain:.0%} of the teacher's validation gain (>= {keep:.0%})"
                  if t_gain > 0 else "the teacher's head does not beat the retrieval order (and the retriever's served "
                                    "list) on validation")
        return {"served": STUDENT_DIR, "reason": reason, "teacher_gain": t_gain, "student_gain": s_gain,
                "keep": keep}
    return {"served": TEACHER_DIR, "teacher_gain": t_gain, "student_gain": s_gain, "keep": keep,
            "reason": f"the student keeps only {max(s_gain, 0.0) / t_gain:.0%} of the teacher's validation gain "
                      f"(< {keep:.0%})"}


def served_ranker(folder: str | Path) -> Path | None:
    """The ranker folder :func:`choose_served` picked under ``folder`` (the student when no choice was
    written, e.g. by an older version), or ``None`` when there is neither."""
    folder = Path(folder)
    name = STUDENT_DIR
    if (folder / SERVED_FILE).is_file():
        try:
            name = json.loads((folder / SERVED_FILE).read_text()).get("served", STUDENT_DIR)
        except (ValueError, AttributeError) as exc:
            raise ArtifactError(f"{folder / SERVED_FILE}: not a JSON object ({exc}); rerun the second stage or "
                                "delete the file") from exc
        if name not in (TEACHER_DIR, STUDENT_DIR):
            raise ArtifactError(f"{folder / SERVED_FILE}: 'served' must be {TEACHER_DIR!r} or {STUDENT_DIR!r}, "
                                f"got {name!r}; rerun the second stage")
    for candidate in (name, STUDENT_DIR, TEACHER_DIR):
        if (folder / candidate / "manifest.json").is_file():
            return folder / candidate
    return None


def student_width(teacher: Any, wanted: int | None) -> int | None:
    """The student's feed-forward width: ``wanted`` when it prunes the teacher's, else ``None`` (unpruned)."""
    return wanted if wanted is not None and wanted < teacher.config.ffn else None


def refit_heads(config: SecondStageConfig | None = None, *, raw: Any = None) -> dict[str, Any]:
    """Refit the hybrid heads of the saved teacher and student of ``config.protocol`` on validation (the
    current :func:`ranking.item_trainer.fit_hybrid_head` rule and ``config.hybrid_ms``), save them and choose
    the served one again; the weights are not touched. Returns each head's report and the choice."""
    from ranking.item_ranker import ItemTokenRanker
    from ranking.item_trainer import fit_hybrid_head

    config = config or SecondStageConfig()
    _, split, folder, retriever = _protocol_stage(config, raw)
    reports, rankers = {}, {}
    for name in (TEACHER_DIR, STUDENT_DIR):
        if not (folder / name / "manifest.json").is_file():
            continue
        ranker = ItemTokenRanker.load(folder / name)
        if ranker.meta.get("history_fingerprint") != split.history("val").fingerprint():
            raise ArtifactError(f"{folder / name}: trained on another split; retrain it (python -m "
                                "pipeline.second_stage --retrain)")
        reports[name] = fit_hybrid_head(ranker, retriever, split, config.hybrid_ms,
                                        covisit=config.covisit or False).report
        ranker.save(folder / name)
        rankers[name] = ranker
    if TEACHER_DIR in rankers:
        reports["served"] = choose_served(rankers[TEACHER_DIR], rankers.get(STUDENT_DIR), config.student_keep)
        atomic_write_json(folder / SERVED_FILE, reports["served"])
    return reports


def ranker_folder(artifacts: str | Path = "artifacts") -> Path:
    """Where the rankers of a pipeline artifact live: ``<root>/rankers/<version>/`` (beside the version
    folder, which stays exactly what ``shortlist train`` wrote and checksummed)."""
    from pipeline.artifacts import resolve_artifact

    version = resolve_artifact(artifacts)
    return version.parent / RANKERS_DIR / version.name


def train_artifact_ranker(artifacts: str | Path = "artifacts", config: SecondStageConfig | None = None, *,
                          progress: bool = True) -> SecondStageResult:
    """Train the second stage for a pipeline artifact (what ``shortlist train-ranker`` runs).

    The split is rebuilt from the artifact's own dataset and protocol (refused when the data on disk differs
    from what it was trained on); the teacher learns from the artifact's two-tower (the hybrid's component,
    moved back to the training history without retraining); the hybrid heads are fitted on the artifact's
    served retriever's validation lists. Written to :func:`ranker_folder`; the artifact is not modified."""
    from pipeline.artifacts import load_artifact
    from pipeline.config import TrainConfig
    from pipeline.evaluate import artifact_data
    from pipeline.train import prepare_split

    config = config or SecondStageConfig(trainer=DEMO_TRAINER, student_trainer=DEMO_STUDENT)
    artifact = load_artifact(artifacts)
    train_config = TrainConfig.from_dict(artifact.manifest["config"]["train"])
    raw = artifact_data(artifact, config.data_path, config.events)
    split = prepare_split(raw, train_config)
    served = artifact.retriever
    components = getattr(served, "components", {served.name: served})
    candidates = components.get("two_tower") or next(
        (c for c in components.values() if c.item_embeddings() is not None), served)
    served.set_history(split.history("val"))
    if candidates is not served:
        candidates.set_history(split.history("val"))
    try:
        return fit_stage(split, raw.items, candidates, ranker_folder(artifacts), config,
                         serving=served.for_candidates(), served=served, progress=progress)
    finally:
        served.set_history(split.history("test"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="a SecondStageConfig JSON file (flags override it)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default=None)
    parser.add_argument("--data-path", default=None)
    parser.add_argument("--steps", type=int, default=None, help="teacher training steps")
    parser.add_argument("--student-steps", type=int, default=None, help="distillation steps")
    parser.add_argument("--student-layers", type=int, nargs="*", default=None,
                        help="teacher layers the student keeps (none: no student)")
    parser.add_argument("--student-ffn", type=int, default=None,
                        help="feed-forward width of the student's layers (0: the teacher's)")
    parser.add_argument("--retriever-loss", choices=("sampled_softmax", "full_softmax"), default=None,
                        help="the candidate two-tower's loss (default: its config's)")
    parser.add_argument("--encoder", choices=("narrow", "minilm"), default=None,
                        help="narrow BERT from scratch, or MiniLM layers with LoRA")
    parser.add_argument("--layers", type=int, default=None, help="encoder layers")
    parser.add_argument("--norm", choices=("post", "pre"), default=None, help="layer order of a narrow encoder")
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument("--hard-horizon", type=int, default=None,
                        help="positions with fewer later training events draw no hard negatives")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--heads-only", action="store_true",
                        help="only refit the saved teacher's and student's hybrid heads on validation")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config = SecondStageConfig.load(args.config) if args.config else SecondStageConfig()
    model, trainer, student = config.model, config.trainer, config.student_trainer
    if args.encoder is not None:
        model = dataclasses.replace(model, encoder=args.encoder)
        if args.encoder == "minilm" and not trainer.peft:
            trainer = dataclasses.replace(trainer, peft="lora")
    if args.layers is not None:
        model = dataclasses.replace(model, layers=args.layers)
    if args.norm is not None:
        model = dataclasses.replace(model, norm=args.norm)
    if args.steps is not None:
        trainer = dataclasses.replace(trainer, max_steps=args.steps)
    if args.hard_horizon is not None:
        trainer = dataclasses.replace(trainer, hard_horizon=args.hard_horizon)
        student = dataclasses.replace(student, hard_horizon=args.hard_horizon)
    if args.eval_every is not None:
        trainer = dataclasses.replace(trainer, eval_every=args.eval_every)
        student = dataclasses.replace(student, eval_every=args.eval_every)
    if args.student_steps is not None:
        student = dataclasses.replace(student, max_steps=args.student_steps)
    if args.threads is not None:
        trainer = dataclasses.replace(trainer, threads=args.threads)
        student = dataclasses.replace(student, threads=args.threads)
    changes: dict[str, Any] = {"model": model, "trainer": trainer, "student_trainer": student}
    for name in ("protocol", "data_path", "out"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    if args.student_layers is not None:
        changes["student_layers"] = tuple(args.student_layers)
    if args.student_ffn is not None:
        changes["student_ffn"] = args.student_ffn or None
    if args.retrain:
        changes["retrain"] = True
    if args.retriever_loss is not None:
        changes["two_tower"] = dataclasses.replace(config.two_tower or TwoTowerConfig(), loss=args.retriever_loss)
    config = dataclasses.replace(config, **changes)
    if args.heads_only:
        print(json.dumps(refit_heads(config), indent=2, default=str))
        return
    result = train_second_stage(config, progress=not args.quiet)
    summary = {"folder": str(result.folder), "seconds": round(result.seconds, 1),
               "teacher_val_ndcg@10": (result.teacher.get("training") or {}).get("best_metric"),
               "teacher_hybrid": (result.teacher.get("hybrid_head") or {}).get("report"),
               "student_val_ndcg@10": (result.student or {}).get("training", {}).get("best_metric"),
               "student_hybrid": ((result.student or {}).get("hybrid_head") or {}).get("report")}
    print(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
