"""ONNX Runtime scoring backends (``"onnx"``, ``"onnx-int8"``): the cross-encoder exported as three graphs.

* ``pairwise.onnx``: ``input_ids``, ``token_type_ids``, ``mask`` ``(B, L)`` -> ``scores`` ``(B,)``;
* ``history.onnx``: ``history_ids``, ``history_mask`` ``(B, Lh)`` -> ``kv`` ``(layers, 2, B, heads, Lh,
  head_dim)`` (every layer's keys and values, stacked);
* ``candidates.onnx``: ``candidate_ids``, ``candidate_mask``, ``position_ids`` ``(N, Lc)``, ``kv``
  ``(layers, 2, 1 or N, heads, Lh, head_dim)`` and ``history_mask`` ``(1 or N, Lh)`` -> ``scores`` ``(N,)``.
  The one-pass mode's positions and masks are ordinary inputs; a batch of 1 history is broadcast to every
  candidate inside the graph, several histories are gathered per candidate row by the caller;
* ``shared.onnx``: the same inputs as ``candidates.onnx`` with ONE history (``kv`` ``(layers, 2, 1, heads,
  Lh, head_dim)``, ``history_mask`` ``(1, Lh)``) -> ``scores`` ``(N,)``: the online case, computed as
  :meth:`~ranking.encoder.CrossEncoder.score_shared` (every candidate token against the history in one dense
  product; no per-candidate copy of the history's keys/values). :meth:`OnnxBackend.score_candidates` uses it
  whenever every candidate row belongs to one history.

Every axis but the layer/head ones is dynamic. Graphs are exported with the classic (TorchScript) exporter,
opset 17; ``onnx-int8`` then applies ``onnxruntime.quantization.quantize_dynamic`` (int8 weights per
channel of the MatMuls with a constant operand; attention stays fp32). On the bundled MiniLM ranker it keeps
a Spearman correlation of 0.99-0.998 with the fp32 order of 100 candidates (per-tensor weights: ~0.96).

An export lives in a folder (``<cache_dir>/fp32`` or ``<cache_dir>/int8``) written atomically with a
``manifest.json`` holding the files' checksums and a checksum of the source model's weights. A folder
whose checksum differs from the model's is stale: :class:`OnnxBackend` re-exports it (or, with
``reexport=False``, refuses it with :class:`~data.errors.ArtifactError`).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from data.errors import ArtifactError, BackendUnavailableError
from data.io import atomic_path, file_checksums, read_manifest, write_manifest
from ranking.backends import ScoringBackend, candidate_scores, check_positions
from ranking.encoder import CrossEncoder
from ranking.inputs import PairwiseBatch

log = logging.getLogger(__name__)

EXPORT_KIND = "onnx_cross_encoder"
OPSET = 17
GRAPHS = ("pairwise", "history", "candidates", "shared")
#: The export's layout version (in the manifest): an export of another version is stale and re-exported.
EXPORT_VERSION = 2


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendUnavailableError(
            "the onnx backends need onnxruntime and onnx; install them with `pip install shortlist[onnx]`"
        ) from exc
    return onnxruntime


def model_checksum(model: CrossEncoder) -> str:
    """SHA-256 of the model's tensors (names, dtypes, shapes, bytes) and its pooling: identifies the weights
    an export came from."""
    digest = hashlib.sha256(model.pairwise_pooling.encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


class _Pairwise(nn.Module):
    def __init__(self, model: CrossEncoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        return self.model.score_pairwise(PairwiseBatch(input_ids, token_type_ids, mask))


class _History(nn.Module):
    def __init__(self, model: CrossEncoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, history_ids: torch.Tensor, history_mask: torch.Tensor) -> torch.Tensor:
        state = self.model.encode_history(history_ids, history_mask)
        return torch.stack([torch.stack([k, v]) for k, v in zip(state.keys, state.values)])


class _Candidates(nn.Module):
    def __init__(self, model: CrossEncoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, candidate_ids: torch.Tensor, candidate_mask: torch.Tensor, position_ids: torch.Tensor,
                kv: torch.Tensor, history_mask: torch.Tensor) -> torch.Tensor:
        return candidate_scores(self.model, list(kv[:, 0]), list(kv[:, 1]), history_mask, candidate_ids,
                                candidate_mask, position_ids)


class _Shared(nn.Module):
    def __init__(self, model: CrossEncoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, candidate_ids: torch.Tensor, candidate_mask: torch.Tensor, position_ids: torch.Tensor,
                kv: torch.Tensor, history_mask: torch.Tensor) -> torch.Tensor:
        return self.model.score_shared(list(kv[:, 0]), list(kv[:, 1]), history_mask, candidate_ids,
                                       candidate_mask, position_ids, check=False)


def _example_inputs(model: CrossEncoder) -> dict[str, tuple[torch.Tensor, ...]]:
    layers, heads = len(model.bert.encoder.layer), model.n_heads
    ids = torch.full((2, 7), 5, dtype=torch.long)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False
    types = torch.zeros_like(ids)
    types[:, 4:] = 1
    kv = torch.zeros(layers, 2, 3, heads, 6, model.head_dim)
    return {
        "pairwise": (ids, types, mask),
        "history": (ids, mask),
        "candidates": (ids[:, :4].repeat(3, 1)[:3], mask[:, :4].repeat(3, 1)[:3],
                       torch.arange(6, 10).expand(3, 4).contiguous(), kv, torch.ones(3, 6, dtype=torch.bool)),
        "shared": (ids[:, :4].repeat(3, 1)[:3], mask[:, :4].repeat(3, 1)[:3],
                   torch.arange(6, 10).expand(3, 4).contiguous(), kv[:, :, :1].contiguous(),
                   torch.tensor([[True] * 5 + [False]])),
    }


_NAMES = {
    "pairwise": (["input_ids", "token_type_ids", "mask"], ["scores"],
                 {"input_ids": {0: "batch", 1: "length"}, "token_type_ids": {0: "batch", 1: "length"},
                  "mask": {0: "batch", 1: "length"}, "scores": {0: "batch"}}),
    "history": (["history_ids", "history_mask"], ["kv"],
                {"history_ids": {0: "batch", 1: "history"}, "history_mask": {0: "batch", 1: "history"},
                 "kv": {2: "batch", 4: "history"}}),
    "candidates": (["candidate_ids", "candidate_mask", "position_ids", "kv", "history_mask"], ["scores"],
                   {"candidate_ids": {0: "candidates", 1: "length"},
                    "candidate_mask": {0: "candidates", 1: "length"},
                    "position_ids": {0: "candidates", 1: "length"}, "kv": {2: "kv_batch", 4: "history"},
                    "history_mask": {0: "kv_batch", 1: "history"}, "scores": {0: "candidates"}}),
    "shared": (["candidate_ids", "candidate_mask", "position_ids", "kv", "history_mask"], ["scores"],
               {"candidate_ids": {0: "candidates", 1: "length"}, "candidate_mask": {0: "candidates", 1: "length"},
                "position_ids": {0: "candidates", 1: "length"}, "kv": {4: "history"},
                "history_mask": {1: "history"}, "scores": {0: "candidates"}}),
}


def export_onnx(model: CrossEncoder, folder: str | Path, *, quantize: bool = False) -> Path:
    """Export ``model``'s three graphs (see the module docstring) into ``folder``, atomically, with a
    manifest.

    ``quantize`` writes the dynamically int8-quantized graphs instead of the fp32 ones.
    """
    _onnxruntime()
    folder = Path(folder)
    if next(model.parameters()).device.type != "cpu":
        model = copy.deepcopy(model).to("cpu")
    was_training = model.training
    model.eval()
    examples = _example_inputs(model)
    try:
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            wrappers = {"pairwise": _Pairwise, "history": _History, "candidates": _Candidates, "shared": _Shared}
            for graph, wrapper in wrappers.items():
                inputs, outputs, axes = _NAMES[graph]
                target = tmp / f"{graph}.onnx"
                with torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # TracerWarnings and the exporter's deprecation notice
                    torch.onnx.export(wrapper(model), examples[graph], str(target), input_names=inputs,
                                      output_names=outputs, dynamic_axes=axes, opset_version=OPSET,
                                      dynamo=False, do_constant_folding=True)
                if quantize:
                    _quantize(target)
            names = [f"{g}.onnx" for g in GRAPHS]
            write_manifest(tmp, {"kind": EXPORT_KIND, "version": EXPORT_VERSION,
                                 "source_checksum": model_checksum(model),
                                 "quantized": quantize, "opset": OPSET, "torch": torch.__version__,
                                 "files": file_checksums(tmp, names)})
    finally:
        if was_training:
            model.train()
    return folder


def _quantize(path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = path.with_suffix(".fp32.onnx")
    path.rename(fp32)
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # its root-logger advice to pre-process the model first
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(str(fp32), str(path), weight_type=QuantType.QInt8, per_channel=True,
                             extra_options={"MatMulConstBOnly": True})
    finally:
        logging.disable(previous)
    fp32.unlink()


def check_export(folder: str | Path, model: CrossEncoder, *, quantize: bool = False) -> dict[str, Any]:
    """The manifest of the export in ``folder`` if it belongs to ``model`` (same weights, same quantization);
    else :class:`ArtifactError` saying why."""
    manifest = read_manifest(folder, kind=EXPORT_KIND)
    if manifest.get("version") != EXPORT_VERSION or set(manifest.get("files", {})) != {f"{g}.onnx" for g in GRAPHS}:
        raise ArtifactError(f"{folder}: the ONNX export has layout version {manifest.get('version')} and files "
                            f"{sorted(manifest.get('files', {}))}, this code needs version {EXPORT_VERSION} with "
                            f"{[f'{g}.onnx' for g in GRAPHS]} (stale); delete the folder or let OnnxBackend "
                            "re-export it (reexport=True)")
    if manifest.get("source_checksum") != model_checksum(model):
        raise ArtifactError(f"{folder}: the ONNX export was made from other model weights (stale); delete "
                            "the folder or let OnnxBackend re-export it (reexport=True)")
    if bool(manifest.get("quantized")) != quantize:
        raise ArtifactError(f"{folder}: the export's quantized={manifest.get('quantized')} but {quantize} "
                            "was asked; use the folder of that variant")
    return manifest


class OnnxBackend(ScoringBackend):
    """ONNX Runtime (CPU) over an export of ``model``; see the module docstring.

    Args:
        model: the cross-encoder (adapters merged; moved to the CPU for export).
        quantize: int8 (``"onnx-int8"``) instead of fp32 (``"onnx"``).
        threads: ONNX Runtime's intra-op threads (inter-op is 1).
        cache_dir: the export's parent folder (default: a temporary folder kept as long as the backend).
        reexport: re-export a stale or broken export instead of raising :class:`ArtifactError`.
    """

    def __init__(self, model: CrossEncoder, *, quantize: bool = False, threads: int = 2,
                 cache_dir: str | Path | None = None, reexport: bool = True) -> None:
        ort = _onnxruntime()
        self.name = "onnx-int8" if quantize else "onnx"
        self.tolerance = 0.1 if quantize else 1e-4
        self.min_spearman = 0.98 if quantize else 0.999
        self.model = model
        self.threads = threads
        if cache_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="shortlist-onnx-")
            cache_dir = self._tmp.name
        self.folder = Path(cache_dir) / ("int8" if quantize else "fp32")
        try:
            check_export(self.folder, model, quantize=quantize)
        except ArtifactError as exc:
            if not reexport and (self.folder / "manifest.json").exists():
                raise
            if (self.folder / "manifest.json").exists():
                log.warning("re-exporting ONNX graphs: %s", exc)
            export_onnx(model, self.folder, quantize=quantize)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Three sessions share 2 cores and a request runs two of them back to back (history, then
        # candidates): idle workers that spin-wait steal the next session's cores (measured on the 2-layer
        # int8 student: a cold one-pass request of 50 candidates took about 34 ms with spinning, 20 without).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.sessions = {g: ort.InferenceSession(str(self.folder / f"{g}.onnx"), options,
                                                 providers=["CPUExecutionProvider"]) for g in GRAPHS}

    def score_pairs(self, batch: PairwiseBatch) -> np.ndarray:
        if batch.input_ids.shape[0] == 0:
            return np.empty(0, dtype=np.float32)
        check_positions(self.model, int(batch.input_ids.shape[1]))
        feeds = {"input_ids": batch.input_ids.numpy(), "token_type_ids": batch.token_type_ids.numpy(),
                 "mask": batch.mask.numpy()}
        return self.sessions["pairwise"].run(None, feeds)[0].astype(np.float32, copy=False)

    def encode_history(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, np.ndarray]:
        """``{"kv", "mask", "lengths"}`` numpy arrays (see the module docstring)."""
        check_positions(self.model, int(ids.shape[1]))
        mask_np = mask.cpu().numpy()
        feeds = {"history_ids": ids.cpu().numpy(), "history_mask": mask_np}
        kv = self.sessions["history"].run(None, feeds)[0]
        return {"kv": kv, "mask": mask_np, "lengths": mask_np.sum(1).astype(np.int64)}

    def score_candidates(self, state: dict[str, np.ndarray], ids: torch.Tensor, mask: torch.Tensor,
                         owner: torch.Tensor | None = None) -> np.ndarray:
        n, length = ids.shape
        if n == 0:
            return np.empty(0, dtype=np.float32)
        kv, history_mask, lengths = state["kv"], state["mask"], state["lengths"]
        graph = "candidates"
        if kv.shape[2] == 1 or owner is None:
            kv, history_mask, start = kv[:, :, :1], history_mask[:1], np.full(n, lengths[0])
            graph = "shared" if history_mask.any() else "candidates"
        else:
            rows = owner.cpu().numpy()
            kv, history_mask, start = kv[:, :, rows], history_mask[rows], lengths[rows]
        positions = start[:, None] + np.arange(length)[None, :]
        check_positions(self.model, int(positions.max()) + 1)
        feeds = {"candidate_ids": ids.cpu().numpy(), "candidate_mask": mask.cpu().numpy(),
                 "position_ids": positions.astype(np.int64), "kv": np.ascontiguousarray(kv),
                 "history_mask": np.ascontiguousarray(history_mask)}
        return self.sessions[graph].run(None, feeds)[0].astype(np.float32, copy=False)

    def state_nbytes(self, state: dict[str, np.ndarray]) -> int:
        return int(state["kv"].nbytes)
