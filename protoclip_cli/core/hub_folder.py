"""An OpenCLIP hub folder: what ``open_clip.push_to_hf_hub`` uploads, written locally, and its upload.

``open_clip.push_to_hf_hub.save_for_hf`` writes ``open_clip_config.json`` (``model_cfg``: the
architecture's whole config; ``preprocess_cfg``: mean, std and resizing) and the weights
(``open_clip_model.safetensors``); ``open_clip.create_model_and_transforms("local-dir:DIR")`` (or
``"hf-hub:USER/NAME"`` once uploaded) rebuilds the model from that config alone, so an
architecture of this package (``protoclip-tiny``) loads without being registered.

Two choices differ from ``push_to_hf_hub``: only the safetensors weights are written (it adds the
same tensors as a pickled ``open_clip_pytorch_model.bin``; open_clip loads the safetensors file
first), and a model whose tokenizer is open_clip's built-in ``SimpleTokenizer`` gets no tokenizer
files (``push_to_hf_hub`` downloads and adds OpenAI's Hugging Face tokenizer files for
``transformers`` users; open_clip itself rebuilds ``SimpleTokenizer`` from the config's context
length). Models with a Hugging Face tokenizer save theirs, as ``save_for_hf`` does.
"""

from __future__ import annotations

from pathlib import Path

from protoclip_cli.core.model import SIGLIP_INIT_LOGIT_BIAS, register_tiny_configs
from protoclip_cli.errors import ProtoclipError

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
README = "README.md"


class _BuiltInTokenizer:
    """Stands in for open_clip's ``SimpleTokenizer`` in ``save_for_hf``: it has no files to save."""

    def save_pretrained(self, folder) -> None:
        pass


def is_hub_folder(folder: Path) -> bool:
    return (Path(folder) / CONFIG_FILE).is_file()


def write_hub_folder(clip, arch: str, folder: Path, readme: str) -> list[Path]:
    """Write the open_clip model ``clip`` of architecture ``arch`` (a name open_clip knows, after
    this package's tiny configs are registered) and its model card into ``folder``."""
    import open_clip
    from open_clip.push_to_hf_hub import save_for_hf

    register_tiny_configs()
    model_config = open_clip.get_model_config(arch)
    if not model_config:
        raise ProtoclipError(f"open_clip has no config for architecture {arch}; the hub folder needs one.")
    if getattr(clip, "logit_bias", None) is not None:  # a sigmoid-loss run: open_clip builds the bias when asked

        model_config = {**model_config, "init_logit_bias": SIGLIP_INIT_LOGIT_BIAS}
    tokenizer = open_clip.get_tokenizer(arch)
    if not hasattr(tokenizer, "save_pretrained"):
        tokenizer = _BuiltInTokenizer()
    folder = Path(folder)
    save_for_hf(clip, tokenizer, model_config, str(folder), safe_serialization=True)
    (folder / README).write_text(readme)
    return sorted(p for p in folder.iterdir() if p.is_file())


def load_hub_folder(folder: Path):
    """``(model, eval preprocess, tokenizer)`` through open_clip's own ``local-dir:`` loading."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    return model.eval(), preprocess, open_clip.get_tokenizer(f"local-dir:{folder}")


def push_folder(folder: Path, repo_id: str, private: bool = False) -> str:
    """Upload ``folder`` to the Hugging Face Hub model repo ``repo_id`` (created when missing);
    returns the commit's URL. Any failure (offline, no login, no network) is one sentence."""
    try:
        from huggingface_hub import create_repo, upload_folder

        create_repo(repo_id, private=private, exist_ok=True)
        commit = upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="Add model (protoclip export)")
    except Exception as error:  # offline mode, connection, authentication, permission: all the same advice
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ProtoclipError(
            f"Could not push {folder} to the Hugging Face Hub repo {repo_id} ({reason}); the folder is complete: "
            f"log in with `hf auth login` where the Hub is reachable and run `hf upload {repo_id} {folder}`."
        ) from error
    return str(getattr(commit, "commit_url", commit))
