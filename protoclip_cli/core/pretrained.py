"""Where a run's towers start: ``model.pretrained`` read as open_clip reads a starting point.

Four kinds, as ``open_clip.create_model`` accepts them:

- a checkpoint file (``/ckpt/ViT-B-32.pt``);
- a pretrained tag of ``model.arch`` (``openai``, ``laion2b_s34b_b79k``: ``open_clip.list_pretrained()``);
- ``hf-hub:ORG/NAME``: an OpenCLIP model repository on the Hugging Face Hub;
- ``local-dir:PATH``: an OpenCLIP hub folder on disk (what ``protoclip export --format hf`` writes).

:func:`fetch_pretrained` checks one before any work and, where the Hub is reachable, brings its
files into the local cache; a tag or hub name that is neither cached nor reachable (a compute node
without network, ``HF_HUB_OFFLINE=1``) is one sentence saying how to fetch it on a connected
machine. The towers of a hub repository or folder are built from its own ``open_clip_config.json``,
which must describe ``model.arch`` (checked), so that every later reader of the run (evaluate,
export, a resume) rebuilds the same architecture from the recipe alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import open_clip

from protoclip_cli.configs.train import ModelConfig
from protoclip_cli.errors import ProtoclipError

HUB, LOCAL_DIR = "hf-hub:", "local-dir:"
HUB_CONFIG = "open_clip_config.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
# Config keys that set a starting value, not the shape of a weight (a sigmoid-loss export carries its bias's).
_INITIAL_VALUES = ("init_logit_bias", "init_logit_scale")


@dataclass(frozen=True)
class Pretrained:
    """A checked ``model.pretrained``: its kind and how ``open_clip.create_model`` is called with it."""

    kind: str  # "none", "file", "tag", "hf-hub" or "local-dir"
    source: str  # model.pretrained as written

    def create_args(self, arch: str) -> tuple[str, str | None]:
        """``(model_name, pretrained)`` for ``open_clip.create_model``: a hub repository or folder is
        the model name (open_clip then reads its config), a file or tag the ``pretrained`` of ``arch``."""
        if self.kind in ("hf-hub", "local-dir"):
            return self.source, None
        return arch, (self.source if self.kind in ("file", "tag") else None)


def kind_of(pretrained: str) -> str:
    if not pretrained:
        return "none"
    if pretrained.startswith(HUB):
        return "hf-hub"
    if pretrained.startswith(LOCAL_DIR):
        return "local-dir"
    if Path(pretrained).is_file() or "/" in pretrained or Path(pretrained).suffix in WEIGHT_SUFFIXES:
        return "file"
    return "tag"


def fetch_pretrained(cfg: ModelConfig) -> Pretrained:
    """Check ``cfg.pretrained`` and bring a tag's or hub repository's files into the local cache
    (a no-op when they are there); every problem is a :class:`ProtoclipError` of one sentence."""
    kind = kind_of(cfg.pretrained)
    if kind == "file" and not Path(cfg.pretrained).is_file():
        raise ProtoclipError(
            f"The pretrained checkpoint {cfg.pretrained} does not exist; set model.pretrained to an OpenCLIP "
            "checkpoint file, a pretrained tag, hf-hub:ORG/NAME or local-dir:PATH, or to '' for a random initialisation."
        )
    if kind == "tag":
        _fetch_tag(cfg.arch, cfg.pretrained)
    elif kind == "hf-hub":
        _check_architecture(cfg.arch, cfg.pretrained, _fetch_hub(cfg.arch, cfg.pretrained))
    elif kind == "local-dir":
        _check_architecture(cfg.arch, cfg.pretrained, _local_folder_config(cfg.pretrained))
    if kind != "none" and ":" in cfg.arch:
        raise ProtoclipError(
            f"model.arch '{cfg.arch}' already names its weights; set model.arch to the architecture's name "
            f"and model.pretrained to '{cfg.arch}'."
        )
    return Pretrained(kind, cfg.pretrained)


def _not_fetched(what: str, call: str, error: BaseException) -> ProtoclipError:
    """The sentence for weights that are neither in the local cache nor downloadable here."""
    from huggingface_hub import constants

    # A cache miss (huggingface_hub's LocalEntryNotFoundError, open_clip's wrapping of it) says no
    # more than the sentence; any other failure (no such repository, no permission) is named.
    reason = "" if isinstance(error, FileNotFoundError) else f" ({_reason(error)})"
    offline = " (HF_HUB_OFFLINE=1 is set)" if constants.HF_HUB_OFFLINE else ""
    return ProtoclipError(
        f"{what} cannot be loaded{reason}: it is not in the local cache {constants.HF_HUB_CACHE} and could not be "
        f"downloaded{offline}; on a machine with network and the same HF_HOME run `python -c \"import open_clip; "
        f"open_clip.{call}\"`, then copy HF_HOME to this machine (or point HF_HOME at a shared copy) and keep "
        "HF_HUB_OFFLINE=1 here."
    )


def _fetch_tag(arch: str, tag: str) -> None:
    config = open_clip.get_pretrained_cfg(arch, tag)
    if not config:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        known = f"its tags: {', '.join(tags)}" if tags else "open_clip has no pretrained tags for it"
        raise ProtoclipError(
            f"model.pretrained '{tag}' is neither a file nor a pretrained tag of {arch} ({known}); set "
            "model.pretrained to one of them, a checkpoint file, hf-hub:ORG/NAME or local-dir:PATH."
        )
    try:
        open_clip.download_pretrained(config)
    except Exception as error:  # huggingface_hub's and urllib's errors: offline, unreachable, not cached
        raise _not_fetched(f"The weights of pretrained tag '{tag}' of {arch}",
                           f"create_model('{arch}', pretrained='{tag}')", error) from error


def _fetch_hub(arch: str, source: str) -> dict:
    """The repository's ``model_cfg``, with its config and weights in the local cache."""
    from huggingface_hub import hf_hub_download

    repo = source[len(HUB):]
    try:
        with open(hf_hub_download(repo, HUB_CONFIG)) as f:
            config = json.load(f)
        open_clip.pretrained.download_pretrained_from_hf(repo)
    except Exception as error:  # offline and not cached, no such repository, no weights file
        raise _not_fetched(f"model.pretrained '{source}'", f"create_model('{source}')", error) from error
    return config.get("model_cfg", {})


def _local_folder_config(source: str) -> dict:
    folder = Path(source[len(LOCAL_DIR):])
    config_file = folder / HUB_CONFIG
    weights = [p for p in folder.glob("*") if p.suffix in WEIGHT_SUFFIXES] if folder.is_dir() else []
    if not config_file.is_file() or not weights:
        raise ProtoclipError(
            f"model.pretrained '{source}': {folder} is no OpenCLIP hub folder (it needs {HUB_CONFIG} and a weights "
            "file); pass a folder written by `protoclip export --format hf` or open_clip's save_for_hf."
        )
    try:
        return json.loads(config_file.read_text()).get("model_cfg", {})
    except ValueError as error:
        raise ProtoclipError(f"{config_file} is not JSON ({error}); pass an OpenCLIP hub folder as model.pretrained.") from error


def _differences(mine: dict, theirs: dict, prefix: str = "") -> list[str]:
    found = []
    for key in sorted(set(mine) | set(theirs)):
        if not prefix and key in _INITIAL_VALUES:
            continue
        a, b = mine.get(key), theirs.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key}")
    return found


def _check_architecture(arch: str, source: str, model_cfg: dict) -> None:
    """The repository's or folder's architecture must be ``arch``'s, so the run rebuilds from its recipe."""
    expected = open_clip.get_model_config(arch)
    if not expected:
        raise ProtoclipError(
            f"Unknown model architecture '{arch}'; set model.arch to the OpenCLIP name of the architecture of {source}."
        )
    differences = _differences(expected, model_cfg)
    if differences:
        raise ProtoclipError(
            f"The open_clip_config.json of {source} describes another architecture than model.arch = {arch} (it "
            f"differs in {', '.join(differences[:3])}); set model.arch to the architecture it was trained as."
        )


def _reason(error: BaseException) -> str:
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text if len(text) <= 160 else text[:160].rsplit(" ", 1)[0] + " ..."
