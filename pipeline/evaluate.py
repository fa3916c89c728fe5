"""Re-evaluate a saved artifact on its dataset's test split."""

from __future__ import annotations

from pathlib import Path

from data.errors import ArtifactError
from data.metrics import MetricReport
from pipeline.artifacts import load_artifact
from pipeline.config import TrainConfig
from pipeline.train import load_dataset, prepare_split
from retrieval.evaluate import evaluate_retriever


def evaluate_artifact(artifacts: str | Path = "artifacts", data_path: str | None = None,
                      n_boot: int = 1000) -> tuple[MetricReport, dict]:
    """Load the artifact, rebuild the split from the same data and score the test items.

    Refuses when the data on disk is not the data the artifact was trained on (fingerprint check).
    """
    artifact = load_artifact(artifacts)
    train_cfg = TrainConfig.from_dict(artifact.manifest["config"]["train"])
    raw = load_dataset(train_cfg.dataset, data_path or train_cfg.data_path)
    if raw.fingerprint() != artifact.manifest["data"]["fingerprint"]:
        raise ArtifactError(
            f"{artifact.folder}: trained on data with fingerprint {artifact.manifest['data']['fingerprint']}, "
            f"but {train_cfg.dataset} on disk has {raw.fingerprint()}; pass the data it was trained on "
            "(--data-path) or retrain"
        )
    split = prepare_split(raw, train_cfg)
    report = evaluate_retriever(artifact.retriever, split, "test", ks=train_cfg.ks, n_boot=n_boot,
                                seed=train_cfg.seed)
    return report, artifact.manifest
