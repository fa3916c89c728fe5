"""Saving and loading a reranker's weights (either variant): merged state dicts, checked against the manifest.

Both rankers store every tensor in one ``model.safetensors`` whose names the manifest lists; these helpers
are the one place that refuses a model still wrapped by peft adapters, and a weights file that is damaged or
holds other tensors than the manifest says.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from data.errors import ArtifactError


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of ``model`` on the CPU, contiguous; refuses a model that still holds peft adapters."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    adapters = [k for k in state if "lora_" in k or "modules_to_save" in k]
    if adapters:
        raise ArtifactError(f"save: the model still holds peft adapters ({adapters[:3]}); merge them first "
                            "(ranking.trainer.merge_adapters)")
    return state


def load_checked(folder: Path, name: str, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of ``folder/name``, whose names must be the manifest's ``tensor_names``; a file the
    safetensors reader cannot parse is reported with its path, like any other damaged artifact."""
    from safetensors.torch import load_file

    try:
        state = load_file(str(folder / name))
    except Exception as exc:
        raise ArtifactError(f"{folder / name}: cannot read the weights ({exc}); re-create the artifact") from exc
    if sorted(state) != sorted(manifest.get("tensor_names", [])):
        raise ArtifactError(f"{folder}: {name} holds other tensors than the manifest lists; re-create the artifact")
    return state


__all__ = ["load_checked", "merged_state_dict"]
