"""The training loop of the two-tower retriever.

Training examples are SASRec-style: a user's item sequence ``x_1..x_T`` gives inputs ``x_1..x_{T-1}`` and
next-item targets ``x_2..x_T`` at every position. Sequences longer than ``max_len`` are cut, from the end,
into consecutive windows of ``max_len`` targets, so every event is a target exactly once per epoch.

The loop shuffles windows with a seeded generator, runs the towers and the loss, clips gradients, and
every ``eval_every`` epochs calls an ``evaluate`` callback (validation NDCG@10) with the towers in eval
mode. It stops after ``patience`` evaluations without improvement and restores the best weights. It uses
a GPU when ``device="auto"`` finds one, and records wall time and throughput.

With ``ema_epochs > 0`` it also keeps an exponential moving average of the weights, updated after every
step (``torch.optim.swa_utils.AveragedModel``), over a horizon of about ``ema_epochs`` epochs
(:func:`ema_decay`). Validation, early stopping and the weights it keeps are the average's; training goes
on from the raw weights, so the average never changes the training trajectory.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


@dataclass
class ItemInputs:
    """Item tower inputs for the whole catalogue (row ``i`` = item row ``i``), as tensors on one device.

    Attributes:
        genres: float32 ``(n, n_genres)``.
        year_bucket: int64 ``(n,)``.
        text: float32 ``(n, text_dim)``.
        counts: float32 ``(n,)`` training events per item (drives the id gate).
    """

    genres: torch.Tensor
    year_bucket: torch.Tensor
    text: torch.Tensor
    counts: torch.Tensor

    @classmethod
    def from_numpy(cls, genres: np.ndarray, year_bucket: np.ndarray, text: np.ndarray, counts: np.ndarray,
                   device: str | torch.device = "cpu") -> ItemInputs:
        return cls(
            genres=torch.as_tensor(np.asarray(genres, dtype=np.float32), device=device),
            year_bucket=torch.as_tensor(np.asarray(year_bucket, dtype=np.int64), device=device),
            text=torch.as_tensor(np.asarray(text, dtype=np.float32), device=device),
            counts=torch.as_tensor(np.asarray(counts, dtype=np.float32), device=device),
        )

    def to(self, device: str | torch.device) -> ItemInputs:
        return ItemInputs(self.genres.to(device), self.year_bucket.to(device), self.text.to(device),
                          self.counts.to(device))


def item_vectors(item_tower: nn.Module, inputs: ItemInputs) -> torch.Tensor:
    """``(n, d)`` vectors of every catalogue item."""
    return item_tower(inputs.genres, inputs.year_bucket, inputs.text, inputs.counts)


def with_padding_row(vectors: torch.Tensor) -> torch.Tensor:
    """``(n + 1, d)``: a zero row (padding, index 0) then ``vectors`` (item row ``i`` at index ``i + 1``)."""
    return torch.cat([vectors.new_zeros(1, vectors.shape[1]), vectors])


def pad_right(sequences: Sequence[np.ndarray], max_len: int, *, shift: int = 1, fill: int = 0) -> np.ndarray:
    """``(len(sequences), L)`` int64: the last ``max_len`` entries of each, plus ``shift``, right-padded
    with ``fill``; ``L`` is the longest kept length (at least 1)."""
    length = max(1, min(max_len, max((len(s) for s in sequences), default=1)))
    out = np.full((len(sequences), length), fill, dtype=np.int64)
    for i, s in enumerate(sequences):
        tail = np.asarray(s[-max_len:], dtype=np.int64)
        if tail.size:
            out[i, :tail.size] = tail + shift
    return out


def training_windows(sequences: Sequence[np.ndarray], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """``(inputs, targets)``, both ``(w, max_len)`` int64, for next-item training.

    ``inputs`` holds item rows + 1, right-padded with 0; ``targets`` the next item's row (-1 = none).
    Every event after a user's first is a target in exactly one window.
    """
    ins: list[np.ndarray] = []
    outs: list[np.ndarray] = []
    for seq in sequences:
        seq = np.asarray(seq, dtype=np.int64)
        if seq.size < 2:
            continue
        x, y = seq[:-1], seq[1:]
        for end in range(y.size, 0, -max_len):
            start = max(0, end - max_len)
            ins.append(x[start:end])
            outs.append(y[start:end])
    if not ins:
        return np.zeros((0, max_len), dtype=np.int64), np.zeros((0, max_len), dtype=np.int64)
    inputs = np.zeros((len(ins), max_len), dtype=np.int64)
    targets = np.full((len(ins), max_len), -1, dtype=np.int64)
    for i, (x, y) in enumerate(zip(ins, outs)):
        inputs[i, :x.size] = x + 1
        targets[i, :y.size] = y
    return inputs, targets


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> ``cuda`` when available, else ``cpu``; otherwise the named device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def ema_decay(ema_epochs: float, steps_per_epoch: int) -> float:
    """The per-step decay of a weight average whose horizon (``1 / (1 - decay)`` steps) is ``ema_epochs``
    epochs of ``steps_per_epoch`` steps; 0 (no average) when that horizon is at most one step."""
    horizon = float(ema_epochs) * int(steps_per_epoch)
    return 1.0 - 1.0 / horizon if horizon > 1 else 0.0


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)`` (0: unchanged), restoring it after."""
    if threads <= 0:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass
class TrainingLog:
    """What a training run did.

    Attributes:
        epochs: epochs run.
        best_epoch: the epoch whose weights were kept (0: none evaluated).
        best_metric: its validation metric.
        stopped_early: whether patience ran out before ``max_epochs``.
        seconds: wall time of the loop, evaluations included.
        train_seconds: time spent in training steps only.
        sequences_per_s: training windows processed per training second.
        events_per_s: next-item targets processed per training second.
        device: the torch device used.
        history: per evaluated epoch: ``epoch``, ``loss`` (mean of that epoch), ``metric``, ``seconds``.
    """

    epochs: int = 0
    best_epoch: int = 0
    best_metric: float = float("-inf")
    stopped_early: bool = False
    seconds: float = 0.0
    train_seconds: float = 0.0
    sequences_per_s: float = 0.0
    events_per_s: float = 0.0
    device: str = "cpu"
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class Trainer:
    """Trains a query tower and an item tower against a loss; see the module docstring.

    Args:
        query_tower: maps ``(seq, item_table)`` to hidden states ``(b, L, d)``.
        item_tower: maps the :class:`ItemInputs` fields to item vectors ``(n, d)``.
        loss: maps ``(queries, target_rows, item_vectors)`` to a scalar.
        item_inputs: the catalogue's item tower inputs.
        config: any object with ``batch_size``, ``learning_rate``, ``lr_schedule``, ``weight_decay``,
            ``grad_clip``, ``max_epochs``, ``patience``, ``eval_every``, ``seed``, ``device``, ``progress``
            and optionally ``ema_epochs`` (a :class:`~retrieval.two_tower.TwoTowerConfig`).
    """

    def __init__(self, query_tower: nn.Module, item_tower: nn.Module, loss: nn.Module, item_inputs: ItemInputs,
                 config: Any) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.query_tower = query_tower.to(self.device)
        self.item_tower = item_tower.to(self.device)
        self.loss = loss.to(self.device)
        self.item_inputs = item_inputs.to(self.device)

    def _modules(self) -> nn.ModuleDict:
        return nn.ModuleDict({"query": self.query_tower, "item": self.item_tower})

    def step_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The loss of one batch of windows (trimmed of trailing all-padding columns)."""
        length = max(1, int((inputs != 0).sum(1).max()))
        inputs, targets = inputs[:, :length], targets[:, :length]
        vectors = item_vectors(self.item_tower, self.item_inputs)
        hidden = self.query_tower(inputs, with_padding_row(vectors))
        valid = targets >= 0
        return self.loss(hidden[valid], targets[valid], vectors)

    def fit(self, inputs: np.ndarray, targets: np.ndarray, evaluate: Callable[[], float]) -> TrainingLog:
        """Train on windows from :func:`training_windows`; ``evaluate()`` returns the validation metric
        (higher is better) of the towers as they are (called in eval mode, under ``torch.no_grad``)."""
        c = self.config
        seed_everything(c.seed)
        modules = self._modules()
        optimizer = torch.optim.AdamW(modules.parameters(), lr=c.learning_rate, weight_decay=c.weight_decay)
        x_all = torch.as_tensor(inputs, device=self.device)
        y_all = torch.as_tensor(targets, device=self.device)
        n_windows = x_all.shape[0]
        total_steps = c.max_epochs * -(-n_windows // c.batch_size)
        if c.lr_schedule == "cosine":  # decays to 0 at max_epochs (early stopping may end sooner)
            schedule = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps)))
        else:
            schedule = None
        n_events = int((targets >= 0).sum())
        order_gen = torch.Generator().manual_seed(c.seed)
        record = TrainingLog(device=str(self.device))
        ema = None
        decay = ema_decay(getattr(c, "ema_epochs", 0.0), -(-n_windows // c.batch_size))
        if decay > 0:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            ema = AveragedModel(modules, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        best_state = copy.deepcopy(modules.state_dict())
        bad_evals = 0
        started = time.perf_counter()
        bar = tqdm(range(1, c.max_epochs + 1), desc="two-tower", unit="epoch", disable=not c.progress)
        for epoch in bar:
            modules.train()
            tick = time.perf_counter()
            total, steps = 0.0, 0
            for batch in torch.randperm(n_windows, generator=order_gen).split(c.batch_size):
                batch = batch.to(self.device)
                loss = self.step_loss(x_all[batch], y_all[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if c.grad_clip > 0:
                    nn.utils.clip_grad_norm_(modules.parameters(), c.grad_clip)
                optimizer.step()
                if ema is not None:
                    ema.update_parameters(modules)
                if schedule is not None:
                    schedule.step()
                total += float(loss.detach())
                steps += 1
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            record.train_seconds += time.perf_counter() - tick
            record.epochs = epoch
            mean_loss = total / max(steps, 1)
            if epoch % c.eval_every and epoch != c.max_epochs:
                bar.set_postfix(loss=f"{mean_loss:.3f}")
                continue
            modules.eval()
            training_state = None
            if ema is not None:  # evaluate (and keep) the average; training goes on from its own weights
                training_state = copy.deepcopy(modules.state_dict())
                modules.load_state_dict(ema.module.state_dict())
            with torch.no_grad():
                metric = float(evaluate())
            record.history.append({"epoch": epoch, "loss": round(mean_loss, 5), "metric": round(metric, 6),
                                   "seconds": round(time.perf_counter() - started, 2)})
            bar.set_postfix(loss=f"{mean_loss:.3f}", val=f"{metric:.4f}", best=f"{max(metric, record.best_metric):.4f}")
            log.info("epoch %d loss %.4f validation %.5f", epoch, mean_loss, metric)
            if metric > record.best_metric:
                record.best_metric, record.best_epoch, bad_evals = metric, epoch, 0
                best_state = copy.deepcopy(modules.state_dict())
            else:
                bad_evals += 1
            if training_state is not None:
                modules.load_state_dict(training_state)
            if bad_evals >= c.patience:
                record.stopped_early = True
                break
        bar.close()
        modules.load_state_dict(best_state)
        modules.eval()
        record.seconds = time.perf_counter() - started
        if record.train_seconds > 0:
            record.sequences_per_s = n_windows * record.epochs / record.train_seconds
            record.events_per_s = n_events * record.epochs / record.train_seconds
        return record


__all__ = [
    "ItemInputs",
    "Trainer",
    "TrainingLog",
    "ema_decay",
    "item_vectors",
    "pad_right",
    "resolve_device",
    "seed_everything",
    "torch_threads",
    "training_windows",
    "with_padding_row",
]
