"""Fewer-layer students of a trained cross-encoder ranker: building them, saving them with a check.

A **student** is a copy of the teacher with fewer encoder layers (:func:`make_student`): the teacher's
embeddings, a chosen subset of its encoder layers (in order) and its scoring head are copied exactly,
and the encoder config says ``num_hidden_layers = len(layers)``. Scoring cost is linear in the layer count,
so a 2-layer student of the 6-layer MiniLM teacher runs about 3x faster in every backend. Training it is
:mod:`ranking.distill`'s job.

**Pruning** (``ffn_width``): the feed-forward blocks hold two thirds of a BERT layer's weights and
multiply-adds. A student can keep only the ``ffn_width`` most important neurons of each copied layer
(:func:`ffn_keep`: the product of the norms of a neuron's input and output weights), before distillation
repairs the loss. On the 2-layer MiniLM student, 512 of 1536 neurons cut the ONNX int8 cost of a
50-candidate request by about a fifth.

**Which layers** (:func:`default_layers`): ``k`` layers spread evenly over the teacher's ``n`` and always
ending at its top layer, ``round((i + 1) * n / k) - 1`` for ``i < k``: of 6 layers, 3 -> ``(1, 3, 5)``,
2 -> ``(2, 5)``, 1 -> ``(5,)``. Keeping the top layer keeps the head's input distribution (the head was
trained on the top layer's states), so the untrained student already ranks much like the teacher; the
spread lower layers keep some of every depth. Any strictly increasing tuple can be passed instead.

**Saved form** (:func:`save_student`): a normal ranker folder (:meth:`CrossEncoderRanker.save`) whose
manifest ``meta`` records ``teacher`` (folder, SHA-256 of its ``model.safetensors``, a fingerprint of its
tensors, its layer count), ``student_layers``, and, after :func:`ranking.distill.distill`,
``distill_config`` and ``quality`` (validation NDCG@10 of student and teacher on the same lists), plus a
``check`` block: a fixed probe of 3 histories x 8 candidates and the scores the student gave at save time.
:func:`verify_student` reloads the folder, re-scores the probe and raises
:class:`~data.errors.ArtifactError` when a score moved by more than the stated tolerance.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.errors import ArtifactError, ConfigError, DataValidationError
from ranking.backends import TorchBackend
from ranking.config import TextConfig
from ranking.cross_encoder import MODEL_FILE, CrossEncoderRanker
from ranking.encoder import CrossEncoder, encoder_from_config
from ranking.text import ItemTokens

_LAYER_KEY = re.compile(r"^bert\.encoder\.layer\.(\d+)\.(.+)$")
#: Histories and candidates per history of the saved probe.
PROBE_SHAPE = (3, 8)
#: Largest score change :func:`verify_student` accepts.
PROBE_TOLERANCE = 1e-5


# ---- building -------------------------------------------------------------------------------------
def default_layers(n_teacher: int, n_student: int) -> tuple[int, ...]:
    """``n_student`` teacher layer indices spread evenly and ending at the top layer (module docstring)."""
    if isinstance(n_student, bool) or not isinstance(n_student, int) or not 1 <= n_student <= n_teacher:
        raise ConfigError(f"n_student must be an integer in [1, {n_teacher}] (the teacher's layer count), "
                          f"got {n_student!r}")
    return tuple(math.floor((i + 1) * n_teacher / n_student + 0.5) - 1 for i in range(n_student))


def teacher_layers(ranker: CrossEncoderRanker) -> int:
    """The encoder layer count of ``ranker``."""
    return len(ranker.model.bert.encoder.layer)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 (16 hex digits) over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        value = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()[:16]


def teacher_record(teacher: CrossEncoderRanker, folder: str | Path | None = None) -> dict[str, Any]:
    """What a student's manifest says about its teacher: folder name and path (when known), the SHA-256 of
    its ``model.safetensors`` from its manifest, a fingerprint of its tensors, layer count and mode."""
    record: dict[str, Any] = {"layers": teacher_layers(teacher), "mode": teacher.mode,
                              "weights_fingerprint": weights_fingerprint(teacher.model)}
    if folder is not None:
        folder = Path(folder)
        record["folder"] = folder.name
        record["path"] = str(folder)
        manifest_path = folder / "manifest.json"
        if manifest_path.is_file():
            manifest = json.loads(manifest_path.read_text())
            record["model_sha256"] = manifest.get("files", {}).get(MODEL_FILE)
            record["val_ndcg@10"] = manifest.get("metrics", {}).get("val_ndcg@10")
    return record


def retext(tokens: ItemTokens, text: TextConfig, item_table: Any = None, tokenizer: Any = None) -> ItemTokens:
    """The catalogue's tokens under new text budgets.

    With ``item_table`` the texts are tokenized again with ``tokenizer``; without it the cached token ids
    are cut again, which is exact when the separator is unchanged and the new per-item budgets are not
    longer than the cached ones (tokenizing with a shorter ``max_length`` keeps a prefix).
    """
    if text == tokens.config:
        return tokens
    if item_table is not None:
        if tokenizer is None:
            raise ConfigError("make_student: the teacher has no tokenizer to re-tokenize item_table with; load the "
                              "teacher with its tokenizer or keep the teacher's TextConfig")
        return ItemTokens.build(item_table, tokens.items, tokenizer, text)
    cached = max(tokens.config.item_tokens, tokens.config.history_item_tokens)
    if text.separator != tokens.config.separator or max(text.item_tokens, text.history_item_tokens) > cached:
        raise ConfigError(
            f"make_student: text needs item texts longer than the cached {cached} tokens or another separator; "
            "pass item_table (the dataset's item table) to re-tokenize"
        )
    return ItemTokens(tokens.items, tokens.flat, tokens.offsets, tokens.special, text)


def check_layers(layers: Any, n_teacher: int) -> tuple[int, ...]:
    """``layers`` as a tuple of ints; :class:`ConfigError` unless it is a non-empty, strictly increasing
    sequence of indices in ``[0, n_teacher)``."""
    values = tuple(layers) if isinstance(layers, (tuple, list)) else None
    if (not values or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in values)
            or any(v < 0 or v >= n_teacher for v in values) or any(b <= a for a, b in itertools.pairwise(values))):
        raise ConfigError(
            f"layers must be a non-empty, strictly increasing tuple of teacher layer indices in [0, {n_teacher}), "
            f"got {layers!r}; e.g. default_layers({n_teacher}, 2) = {default_layers(n_teacher, min(2, n_teacher))}"
        )
    return tuple(int(v) for v in values)


def make_student(teacher: CrossEncoderRanker, layers: tuple[int, ...], text: TextConfig | None = None,
                 item_table: Any = None, *, teacher_folder: str | Path | None = None,
                 ffn_width: int | None = None) -> CrossEncoderRanker:
    """A ranker holding exact copies of the teacher's embeddings, its encoder layers ``layers`` (in that
    order, renumbered ``0..k-1``) and its head; same mode, config and tokenizer.

    ``ffn_width`` (default: the teacher's ``intermediate_size``) prunes every copied layer's feed-forward
    block to that many neurons, keeping the most important ones (:func:`ffn_keep`); the encoder
    config's ``intermediate_size`` says the new width, so the saved student loads like any BERT.

    ``text`` (default: the teacher's) sets shorter text budgets for the student; the catalogue tokens are
    rebuilt from ``item_table`` with the teacher's tokenizer when given, else cut from the cached ids
    (:func:`retext`). Histories are not copied: call ``set_history`` on the student. ``teacher_folder``
    (where the teacher was loaded from) goes into the student's ``meta["teacher"]``.
    """
    n_teacher = teacher_layers(teacher)
    layers = check_layers(layers, n_teacher)
    state = teacher.model.state_dict()
    adapters = [k for k in state if "lora_" in k or "modules_to_save" in k]
    if adapters:
        raise ConfigError(f"make_student: the teacher still holds peft adapters ({adapters[:2]}); merge them first "
                          "(ranking.trainer.merge_adapters)")
    width = int(teacher.encoder_config.get("intermediate_size", 0))
    if ffn_width is not None and (isinstance(ffn_width, bool) or not isinstance(ffn_width, (int, np.integer))
                                  or not 1 <= ffn_width <= width):
        raise ConfigError(f"ffn_width must be an integer in [1, {width}] (the teacher's intermediate_size), "
                          f"got {ffn_width!r}")
    ffn_width = width if ffn_width is None else int(ffn_width)
    encoder_config = {**teacher.encoder_config, "num_hidden_layers": len(layers), "intermediate_size": ffn_width}
    rng_state = torch.random.get_rng_state()
    try:  # construction draws random initial weights that are overwritten below; keep the caller's RNG
        encoder = encoder_from_config(encoder_config)
        model = CrossEncoder(encoder, teacher.config.head_hidden, teacher.config.head_dropout,
                             teacher.config.pairwise_pooling)
    finally:
        torch.random.set_rng_state(rng_state)
    source_of = {i: j for i, j in enumerate(layers)}
    student_state = {}
    for name in model.state_dict():
        match = _LAYER_KEY.match(name)
        source = f"bert.encoder.layer.{source_of[int(match.group(1))]}.{match.group(2)}" if match else name
        if source not in state:
            raise ConfigError(f"make_student: the teacher has no tensor {source!r} for the student's {name!r}; "
                              "the teacher's encoder layout is not BERT's")
        student_state[name] = state[source].detach().clone()
    kept: dict[int, list[int]] = {}
    if ffn_width < width:
        for i, j in source_of.items():
            prefix, source = f"bert.encoder.layer.{i}.", f"bert.encoder.layer.{j}."
            keep = ffn_keep(state[source + "intermediate.dense.weight"], state[source + "output.dense.weight"],
                            ffn_width)
            kept[i] = keep.tolist()
            for suffix in ("intermediate.dense.weight", "intermediate.dense.bias"):
                student_state[prefix + suffix] = student_state[prefix + suffix][keep].clone()
            student_state[prefix + "output.dense.weight"] = student_state[prefix + "output.dense.weight"][:, keep].clone()
    model.load_state_dict(student_state, strict=True)
    model.to(next(teacher.model.parameters()).device).eval()
    text = text or teacher.config.text
    tokens = retext(teacher.tokens, text, item_table, teacher.tokenizer)
    config = dataclasses.replace(teacher.config, text=text)
    meta = {"teacher": teacher_record(teacher, teacher_folder), "student_layers": list(layers)}
    if kept:
        meta["ffn_pruning"] = {"width": ffn_width, "teacher_width": width, "importance": FFN_IMPORTANCE}
    return CrossEncoderRanker(model, tokens, config, encoder_config=encoder_config, tokenizer=teacher.tokenizer,
                              meta=meta)


FFN_IMPORTANCE = "|w_in| * |w_out| (L2 norms of a neuron's input row and output column)"


def ffn_keep(w_in: torch.Tensor, w_out: torch.Tensor, width: int) -> torch.Tensor:
    """Sorted indices of the ``width`` feed-forward neurons to keep: the largest products of the L2 norms of
    a neuron's input weights (``w_in`` row, ``(inter, hidden)``) and output weights (``w_out`` column,
    ``(hidden, inter)``), a data-free magnitude estimate of how much the neuron can move the output. Ties go
    to the lower index (stable sort), so the choice is deterministic."""
    importance = w_in.float().norm(dim=1) * w_out.float().norm(dim=0)
    order = torch.sort(importance, descending=True, stable=True).indices[:width]
    return torch.sort(order).values


# ---- saving and checking --------------------------------------------------------------------------
def probe(items: np.ndarray, shape: tuple[int, int] = PROBE_SHAPE, seed: int = 0,
          ) -> tuple[list[list[int]], list[list[int]]]:
    """A fixed probe over catalogue ``items``: ``shape[0]`` histories of 1, 5, 12, 1, ... items and
    ``shape[1]`` candidates each (not in that history while the catalogue has enough items)."""
    rng = np.random.default_rng(seed)
    ids = np.sort(np.asarray(items, dtype=np.int64))
    if ids.size == 0:
        raise DataValidationError("probe: the catalogue is empty; a student needs items to score")
    histories, candidates = [], []
    for h in range(shape[0]):
        order = rng.permutation(ids.size)
        size = min((1, 5, 12)[h % 3], ids.size - 1)
        rest = order[size:] if order.size > size else order
        histories.append(ids[order[:size]].tolist())
        candidates.append(ids[np.resize(rest, shape[1])].tolist())
    return histories, candidates


def probe_scores(ranker: CrossEncoderRanker, histories: list[list[int]], candidates: list[list[int]]) -> list[list[float]]:
    """The ranker's scores of every probe list (cold history cache, eager fp32 torch)."""
    backend = ranker.backend
    ranker.backend = TorchBackend(ranker.model, "cpu")
    try:
        ranker.clear_cache()
        return [ranker.score(h, c).astype(np.float64).tolist() for h, c in zip(histories, candidates)]
    finally:
        ranker.backend = backend
        ranker.clear_cache()


def save_student(student: CrossEncoderRanker, folder: str | Path, *, metrics: dict[str, Any] | None = None) -> Path:
    """Save ``student`` as a ranker folder whose meta also holds the ``check`` probe (module docstring)."""
    if "student_layers" not in student.meta or "teacher" not in student.meta:
        raise ArtifactError("save_student: the ranker's meta has no 'teacher'/'student_layers'; build it with "
                            "make_student")
    histories, candidates = probe(student.items.ids)
    student.meta["check"] = {"histories": histories, "candidates": candidates,
                             "scores": probe_scores(student, histories, candidates), "tolerance": PROBE_TOLERANCE,
                             "backend": "torch fp32, cold history cache"}
    return student.save(folder, metrics=metrics)


def verify_student(folder: str | Path) -> dict[str, Any]:
    """Reload a saved student, re-score its probe and compare with the scores saved in its manifest.

    Returns ``{"folder", "layers", "student_layers", "teacher", "quality", "max_abs_diff"}``; raises
    :class:`~data.errors.ArtifactError` when the folder does not load, holds no check block, its layer
    count disagrees with ``student_layers``, or a probe score differs by more than the saved tolerance.
    """
    folder = Path(folder)
    ranker = CrossEncoderRanker.load(folder)
    check = ranker.meta.get("check")
    layers = ranker.meta.get("student_layers")
    if not isinstance(check, dict) or layers is None:
        raise ArtifactError(f"{folder}: the manifest has no student check block; this is not a distilled student "
                            "(re-create it with ranking.distill)")
    if len(layers) != teacher_layers(ranker):
        raise ArtifactError(f"{folder}: the model has {teacher_layers(ranker)} layers but the manifest says "
                            f"student_layers={layers}; re-create the artifact")
    try:
        histories, candidates = check["histories"], check["candidates"]
        expected = [np.asarray(s, dtype=np.float64) for s in check["scores"]]
        tolerance = float(check.get("tolerance", PROBE_TOLERANCE))
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{folder}: the check block is incomplete ({exc}); re-create the artifact") from exc
    got = probe_scores(ranker, histories, candidates)
    if len(got) != len(expected) or any(len(g) != e.size for g, e in zip(got, expected)):
        raise ArtifactError(f"{folder}: the check block's scores do not match its probe's shape; re-create it")
    diff = max((float(np.max(np.abs(np.asarray(g) - e))) for g, e in zip(got, expected) if e.size), default=0.0)
    if not diff <= tolerance:
        raise ArtifactError(
            f"{folder}: the reloaded student scores its probe up to {diff:.3g} away from the saved scores "
            f"(tolerance {tolerance:g}); the weights or the manifest were changed, re-create the artifact"
        )
    return {"folder": str(folder), "layers": teacher_layers(ranker), "student_layers": layers,
            "teacher": ranker.meta.get("teacher"), "quality": ranker.meta.get("quality"), "max_abs_diff": diff}
