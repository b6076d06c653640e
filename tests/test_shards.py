"""Shard reading: every sample once, also inside data-loader workers that split shards."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from protoclip_cli.data.shards import iter_captions, iter_samples


class _PerWorkerShards(IterableDataset):
    def __init__(self, shards):
        self.shards = shards

    def __iter__(self):
        worker = get_worker_info()
        for key, _ in iter_captions(self.shards[worker.id :: worker.num_workers]):
            yield torch.tensor(key)


def test_iter_samples_reads_every_record_in_order(synthetic_workspace):
    shards = synthetic_workspace.shards("synthetic", "heldout")
    samples = list(iter_samples(shards))
    keys = [s.key for s in samples]
    assert len(set(keys)) == len(keys) == 256  # img2dataset writes a shard in completion order
    assert all(s.image[:2] == b"\xff\xd8" and s.caption and "class_name" in s.meta for s in samples)


def test_workers_that_split_shards_still_see_every_sample(synthetic_workspace):
    """A caller splitting shards across workers must not be split again by webdataset."""
    shards = synthetic_workspace.shards("synthetic", "heldout")
    loader = DataLoader(_PerWorkerShards(shards), batch_size=None, num_workers=2)
    keys = sorted(int(k) for k in loader)
    assert keys == sorted(key for key, _ in iter_captions(shards))


def _tar(path, captions):
    import io
    import tarfile

    path.parent.mkdir(parents=True)
    with tarfile.open(path, "w") as tar:
        for i, caption in enumerate(captions):
            for ext, data in (("jpg", b"\xff\xd8" + bytes(500)), ("txt", caption)):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_a_damaged_shard_is_one_sentence_naming_it_and_verify(tmp_path):
    import pytest

    from protoclip_cli.errors import ProtoclipError

    good = _tar(tmp_path / "mine" / "shards" / "00000.tar", [b"a", b"b"])
    bad_caption = _tar(tmp_path / "mine" / "heldout" / "00000.tar", [b"a", b"\xff\xfe"])
    cut = _tar(tmp_path / "other" / "shards" / "00001.tar", [b"a", b"b", b"c"])
    cut.write_bytes(cut.read_bytes()[:1800])
    with pytest.raises(ProtoclipError, match=rf"^Shard {bad_caption} is damaged \('utf-8' codec can't decode .*\); "
                                             r"repair the data set with `protoclip download mine --verify`\.$"):
        list(iter_samples([good, bad_caption]))
    with pytest.raises(ProtoclipError, match=rf"^Shard {cut} is damaged \(unexpected end of data\); repair the data "
                                             r"set with `protoclip download other --verify`\.$"):
        list(iter_captions([good, cut]))
