"""``protoclip export``'s config: an OpenCLIP checkpoint file or hub folder of a run."""

from __future__ import annotations

from dataclasses import dataclass

from protoclip_cli.config import option, require

FORMATS = ("open_clip", "hf")


@dataclass(frozen=True)
class ExportConfig:
    run: str = option("", "Run name, run folder or checkpoint file ('' = the workspace's latest run).")
    checkpoint: str = option("", "Checkpoint to export ('' = the run's latest).")
    format: str = option("open_clip", "Export format: open_clip (one .pt file) or hf (an OpenCLIP hub folder).")
    out: str = option(
        "", "Output file (open_clip) or folder (hf); '' = runs/<run>/export/<run>-<arch>.pt or <run>-<arch>-hf/."
    )
    push: str = option(
        "", "With --format hf: also upload the folder to this Hugging Face Hub model repo (USER/NAME; needs the "
        "network and `hf auth login`)."
    )
    private: bool = option(False, "With --push: create the Hub repo as private.")
    license: str = option(
        "other", "License in the model card's metadata (a Hugging Face license id such as apache-2.0; other = unstated)."
    )

    def __post_init__(self) -> None:
        require(self.format in FORMATS, f"Unknown export format '{self.format}'; choose one of {', '.join(FORMATS)}.")
        require(not self.push or self.format == "hf", "--push uploads an OpenCLIP hub folder; add --format hf.")
        require(not self.push or self.push.count("/") == 1, f"--push {self.push} is not a Hub repo id; use USER/NAME.")
