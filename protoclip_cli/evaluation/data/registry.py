"""The evaluation data sets by the name ``evaluate --dataset`` gives them, and the reader of each.

A name of ``EXTERNAL`` (``configs/evaluate.py``) is read from ``--root``: ImageNet, torchvision's
CIFAR and STL-10 files, an ImageFolder, COCO, Flickr30k or webdataset shards; any other name is a
workspace data set (``protoclip download``), its ``heldout`` split scored and its ``train`` split
a linear probe's training side. ``role`` says which side a task asks for: ``test`` or ``train``.
"""

from __future__ import annotations

from pathlib import Path

from protoclip_cli.configs.evaluate import EXTERNAL, EvaluateConfig, require_root
from protoclip_cli.errors import ProtoclipError
from protoclip_cli.evaluation.data import readers
from protoclip_cli.evaluation.data.image_set import ImageSet
from protoclip_cli.workspace import Workspace


class DataSets:
    """The data sets of one ``evaluate`` call, each read once (the shard metadata pass is not free)."""

    def __init__(self, config: EvaluateConfig, workspace: Workspace, default_dataset: str) -> None:
        self.config, self.workspace, self.default_dataset = config, workspace, default_dataset
        self._sets: dict[tuple[str, str], ImageSet] = {}

    def get(self, dataset: str, role: str = "test") -> ImageSet:
        """``dataset`` ('' = the default one) as the ``role`` side of a task, read on first use."""
        if (dataset, role) not in self._sets:
            self._sets[(dataset, role)] = self._read(dataset, role)
        return self._sets[(dataset, role)]

    def _read(self, dataset: str, role: str) -> ImageSet:
        c = self.config
        if dataset not in EXTERNAL:
            split = "train" if role == "train" else c.heldout_split
            return readers.embedded(self.workspace, dataset or self.default_dataset, split)
        require_root(c, dataset)
        root = Path(c.root)
        if dataset == "imagenet":
            return readers.imagenet(root, "train" if role == "train" else "val")
        if dataset in readers.TORCHVISION_SETS:
            return readers.torchvision_set(dataset, root, train=role == "train")
        if dataset == "folder":
            has_splits = (root / "train").is_dir() and (root / "test").is_dir()
            if role == "train" and not has_splits:
                raise ProtoclipError(f"The linear probe needs {root}/train/<class>/ and {root}/test/<class>/ folders.")
            folder = root / ("train" if role == "train" else "test") if has_splits else root
            return readers.image_folder(folder, c.classnames or None, name=f"{root.name}-{folder.name}")
        if dataset == "coco":
            return readers.coco(root, c.captions or None)
        if dataset == "flickr30k":
            return readers.flickr30k(root, c.captions or None, c.split)
        return readers.webdataset_pairs(c.root)
