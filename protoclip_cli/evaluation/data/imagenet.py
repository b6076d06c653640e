"""ImageNet-1k class names and prompt templates for zero-shot evaluation.

Class index i is the i-th WordNet id in sorted order (the usual ImageNet-1k indexing, which
torchvision's ImageFolder also gives a full ``val/<wnid>/`` folder); its name is open_clip's
``IMAGENET_CLASSNAMES[i]``. The wnid list comes from timm (a dependency of open_clip).
"""

from __future__ import annotations

from functools import lru_cache

from protoclip_cli.errors import ProtoclipError


def classnames() -> list[str]:
    """open_clip's 1000 ImageNet class names, in wnid-sorted index order."""
    import open_clip

    return list(open_clip.IMAGENET_CLASSNAMES)


def templates() -> list:
    """The 80 OpenAI prompt templates (callables taking a class name)."""
    import open_clip

    return list(open_clip.OPENAI_IMAGENET_TEMPLATES)


@lru_cache(maxsize=1)
def wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k WordNet ids, sorted (index i = class i)."""
    from timm.data import ImageNetInfo

    ids = tuple(ImageNetInfo("imagenet-1k").label_names())
    if len(ids) != 1000 or list(ids) != sorted(ids):
        raise RuntimeError("timm's ImageNet-1k synset list is not the 1000 sorted wnids")
    return ids


def class_index_of(wnid_folders: list[str]) -> dict[str, int]:
    """Map each ``val/<wnid>`` folder name to its ImageNet-1k class index, or explain what is wrong."""
    index = {wnid: i for i, wnid in enumerate(wnids())}
    unknown = [name for name in wnid_folders if name not in index]
    if unknown:
        raise ProtoclipError(
            f"Folder '{unknown[0]}' is not an ImageNet-1k wnid; the ImageNet root must hold one "
            "folder per class named by its wnid (e.g. val/n01440764/*.JPEG)."
        )
    return {name: index[name] for name in wnid_folders}
