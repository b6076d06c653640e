"""Evaluation data sources, the ImageNet preset and bad inputs (no trained run needed: an
OpenCLIP checkpoint of the tiny architecture with random weights stands in for a model)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from protoclip_cli.errors import ProtoclipError

torch.set_num_threads(2)

WNIDS = {"n01440764": (0, "tench"), "n01443537": (1, "goldfish"), "n02123045": (281, "tabby cat")}


def _jpegs(folder: Path, count: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (36, 48, 3), dtype=np.uint8)).save(folder / f"img{i}.JPEG", "JPEG")


@pytest.fixture(scope="module")
def fake_imagenet(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    for seed, wnid in enumerate(WNIDS):
        _jpegs(root / "val" / wnid, 2 + seed, seed)
    return root


@pytest.fixture(scope="module")
def folder_set(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("folder")
    for split in ("train", "test"):
        for label, name in enumerate(("ant", "bee", "cow")):
            _jpegs(root / split / name, 4, 10 * label + (split == "test"))
    return root


def test_imagenet_folders_get_their_indices_and_open_clip_names(fake_imagenet):
    from protoclip_cli.evaluation.data.readers import imagenet
    from protoclip_cli.evaluation.tasks.zeroshot import prompts_for

    data = imagenet(fake_imagenet, "val")
    assert data.size == 2 + 3 + 4 and len(data.classnames) == 1000 and len(data.templates) == 80
    dataset = data.images(lambda image: image)
    for row in range(data.size):
        wnid = Path(dataset.sources[row][0]).parent.name  # (file, offset, size)
        index, name = WNIDS[wnid]
        assert data.labels[row] == index and data.classnames[index] == name
    prompts = prompts_for(data.classnames, data.templates)
    assert len(prompts) == 1000 and all(len(p) == 80 for p in prompts)
    assert prompts[281][0] == "a bad photo of a tabby cat."


class BagOfTokens(torch.nn.Module):
    """A CLIP-like pair of towers whose text side is cheap enough to embed 80,000 prompts in a test."""

    def __init__(self, clip: torch.nn.Module) -> None:
        super().__init__()
        self.visual_clip = clip
        self.bag = torch.nn.EmbeddingBag(49408, 128, mode="mean")
        self.texts_seen = 0

    def encode_image(self, images):
        return self.visual_clip.encode_image(images)

    def encode_text(self, tokens):
        self.texts_seen += tokens.shape[0]
        return self.bag(tokens)


def test_imagenet_zeroshot_task_embeds_1000_by_80_prompts(fake_imagenet, tiny_open_clip, tmp_path):
    from protoclip_cli.evaluation.data.readers import imagenet
    from protoclip_cli.evaluation.tasks import zeroshot
    from protoclip_cli.evaluation.tasks.model import load_open_clip

    model = load_open_clip("protoclip-tiny", str(tiny_open_clip), "cpu")
    model.clip = BagOfTokens(model.clip)
    result = zeroshot.evaluate(model, imagenet(fake_imagenet), None, tmp_path, batch_size=4, workers=0)
    assert model.clip.texts_seen == 80_000
    assert result["classes"] == 1000 and result["templates"] == 80 and result["images"] == 9
    assert set(result["metrics"]) == {"top1", "top5", "mean_per_class_recall"}
    # Cached: the second call embeds nothing.
    zeroshot.evaluate(model, imagenet(fake_imagenet), None, tmp_path, batch_size=4, workers=0)
    assert model.clip.texts_seen == 80_000
    assert len(list(tmp_path.glob("imagenet-val-image.*.pt"))) == 1


def test_imagenet_root_with_wrong_layout_is_rejected(tmp_path):
    from protoclip_cli.evaluation.data.readers import imagenet

    _jpegs(tmp_path / "val" / "cats", 2, 0)
    with pytest.raises(ProtoclipError, match="'cats' is not an ImageNet-1k wnid"):
        imagenet(tmp_path)
    with pytest.raises(ProtoclipError, match=r"does not exist; expected .*/train/<wnid>/\*\.JPEG"):
        imagenet(tmp_path, "train")


def test_image_folder_layout_and_classnames_errors(tmp_path, folder_set):
    from protoclip_cli.evaluation.data.prompts import read_templates
    from protoclip_cli.evaluation.data.readers import image_folder

    _jpegs(tmp_path / "flat", 3, 0)
    with pytest.raises(ProtoclipError, match="is not an ImageFolder \\(it holds 3 loose images and no class folders\\)"):
        image_folder(tmp_path / "flat", None)
    with pytest.raises(ProtoclipError, match="class-names file .*missing.txt does not exist"):
        image_folder(folder_set / "test", tmp_path / "missing.txt")
    (tmp_path / "two.txt").write_text("ant\nbee\n")
    with pytest.raises(ProtoclipError, match="has 2 names but there are 3 class folders"):
        image_folder(folder_set / "test", tmp_path / "two.txt")
    (tmp_path / "mapped.txt").write_text("cow\ta cow\nant\tan ant\nbee\ta bee\n")
    assert image_folder(folder_set / "test", tmp_path / "mapped.txt").classnames == ["an ant", "a bee", "a cow"]
    (tmp_path / "t.txt").write_text("a photo of a {}.\nno placeholder\n")
    with pytest.raises(ProtoclipError, match="'no placeholder' .* has no '\\{\\}'"):
        read_templates(tmp_path / "t.txt")


def _cli(*args: str):
    from typer.testing import CliRunner

    from protoclip_cli.cli import app

    return CliRunner().invoke(app, list(args))


def test_cli_folder_tasks_write_results(folder_set, tiny_open_clip, tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("ant\nbee\ncow\n")
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {}.\na drawing of a {}.\n")
    result = _cli(
        "evaluate", "--open-clip", "protoclip-tiny", "--pretrained", str(tiny_open_clip), "--task", "all",
        "--dataset", "folder", "--root", str(folder_set), "--classnames", str(names), "--templates", str(templates),
        "--workers", "0", "--workspace", str(tmp_path / "ws"),
    )
    assert result.exit_code == 0, result.output
    eval_dir = tmp_path / "ws" / "eval" / "protoclip-tiny-tiny.pt"
    written = sorted(p.name for p in eval_dir.glob("*.json"))
    assert written == ["clustering-folder.json", "linear-probe-folder.json", "manifest.json", "zeroshot-folder.json"]
    zeroshot = json.loads((eval_dir / "zeroshot-folder.json").read_text())
    assert zeroshot["classes"] == 3 and zeroshot["templates"] == 2 and zeroshot["images"] == 12
    assert set(zeroshot["metrics"]) == {"top1", "mean_per_class_recall"}  # top-5 of 3 classes is skipped
    correct = zeroshot["metrics"]["top1"] * 12 / 100
    assert abs(correct - round(correct)) < 1e-3 and 0 <= round(correct) <= 12
    probe = json.loads((eval_dir / "linear-probe-folder.json").read_text())
    assert probe["train_images"] == 12 and probe["test_images"] == 12
    manifest = json.loads((eval_dir / "manifest.json").read_text())
    assert set(manifest["results"]) == {"zeroshot-folder", "linear-probe-folder", "clustering-folder"}
    assert "zeroshot-folder" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "folder", "--root", "{flat}", "--task", "zeroshot"], "is not an ImageFolder"),
        (["--dataset", "folder", "--root", "{folder}", "--task", "zeroshot", "--classnames", "{missing}"],
         "class-names file"),
        (["--task", "imagenet-zeroshot", "--imagenet-root", "{flat}"], "does not exist; expected"),
        (["--task", "retrieval", "--dataset", "cifar10", "--root", "{flat}"], "has no data for the retrieval task"),
        (["--task", "nonsense"], "Unknown task 'nonsense'"),
    ],
)
def test_cli_bad_inputs_exit_non_zero_with_a_sentence(args, message, tmp_path, folder_set, tiny_open_clip):
    _jpegs(tmp_path / "flat", 2, 0)
    filled = [a.format(flat=tmp_path / "flat", folder=folder_set / "test", missing=tmp_path / "none.txt") for a in args]
    result = _cli("evaluate", "--open-clip", "protoclip-tiny", "--pretrained", str(tiny_open_clip), "--workers", "0",
                  "-w", str(tmp_path / "ws"), *filled)
    assert result.exit_code == 1, result.output
    assert "error:" in result.stderr and message in " ".join(result.stderr.split())
    assert not (tmp_path / "ws" / "eval").exists()  # nothing half-written


def test_run_without_checkpoint_is_a_clear_error(tmp_path):
    run_dir = tmp_path / "ws" / "runs" / "empty-run"
    run_dir.mkdir(parents=True)
    (run_dir / "config.toml").write_text('name = "empty-run"\n')
    result = _cli("evaluate", "empty-run", "--task", "zeroshot", "--workspace", str(tmp_path / "ws"))
    assert result.exit_code == 1
    assert "error: Run " in result.output and "has no checkpoint yet; train it first" in " ".join(result.output.split())


def _torchvision_files(root: Path, name: str, classes: list[str], count: int, seed: int) -> None:
    """CIFAR-10/100 or STL-10 test files in torchvision's formats (pickles; STL-10 binaries)."""
    import pickle

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(classes), count)
    if name == "stl10":
        folder = root / "stl10_binary"
        folder.mkdir(parents=True)
        rng.integers(0, 255, (count, 3, 96, 96), dtype=np.uint8).tofile(folder / "test_X.bin")
        (labels + 1).astype(np.uint8).tofile(folder / "test_y.bin")  # STL-10 labels are 1-based on disk
        (folder / "class_names.txt").write_text("\n".join(classes) + "\n")
        return
    folder = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True)
    data = rng.integers(0, 255, (count, 3072), dtype=np.uint8)
    label_key, names_key = ("labels", "label_names") if name == "cifar10" else ("fine_labels", "fine_label_names")
    with open(folder / ("test_batch" if name == "cifar10" else "test"), "wb") as f:
        pickle.dump({"data": data, label_key: labels.tolist()}, f)
    with open(folder / ("batches.meta" if name == "cifar10" else "meta"), "wb") as f:
        pickle.dump({names_key: classes}, f)


@pytest.fixture
def official_files_accepted(monkeypatch):
    """torchvision checks the md5 of the official archives; these small files stand in for them."""
    import torchvision.datasets.cifar as cifar
    import torchvision.datasets.stl10 as stl10

    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    monkeypatch.setattr(stl10, "check_integrity", lambda *args, **kwargs: True)


@pytest.mark.parametrize(
    "name, classes, templates, some_prompts",
    [
        ("cifar10", 10, 18, {0: "a photo of a airplane.", 17: "a photo of the big airplane.", 179: "a photo of the big truck."}),
        ("cifar100", 100, 18, {17: "a photo of the big apple.", 29: "a black and white photo of the aquarium fish."}),
        ("stl10", 10, 2, {0: "a photo of a airplane.", 1: "a photo of the airplane.", 15: "a photo of the monkey."}),
    ],
)
def test_cifar_and_stl_zeroshot_prompt_their_own_templates_times_class_names(
    name, classes, templates, some_prompts, official_files_accepted, tiny_open_clip, tmp_path
):
    from protoclip_cli.evaluation.data.prompts import CLASSNAMES, TEMPLATES
    from protoclip_cli.evaluation.data.readers import torchvision_set
    from protoclip_cli.evaluation.tasks import zeroshot
    from protoclip_cli.evaluation.tasks.model import load_open_clip

    on_disk = [c.replace(" ", "_") for c in CLASSNAMES[name]]  # as the official meta files spell them
    _torchvision_files(tmp_path / "data", name, on_disk, count=6, seed=classes)
    data = torchvision_set(name, tmp_path / "data", train=False)
    model = load_open_clip("protoclip-tiny", str(tiny_open_clip), "cpu")
    seen: list[str] = []
    encode = model.encode_texts
    model.encode_texts = lambda texts: (seen.extend(texts), encode(texts))[1]
    result = zeroshot.evaluate(model, data, None, None, batch_size=4, workers=0)

    assert len(CLASSNAMES[name]) == classes and len(TEMPLATES[name]) == templates
    assert seen == [t.format(c) for c in CLASSNAMES[name] for t in TEMPLATES[name]]
    assert {i: seen[i] for i in some_prompts} == some_prompts
    assert (result["templates"], result["templates_from"], result["classes"]) == (templates, "dataset", classes)


def test_torchvision_set_with_another_class_list_is_refused(official_files_accepted, tmp_path):
    from protoclip_cli.evaluation.data.readers import torchvision_set

    _torchvision_files(tmp_path, "cifar10", ["cat", "dog"], count=4, seed=0)
    with pytest.raises(ProtoclipError, match="is not cifar10's"):
        torchvision_set("cifar10", tmp_path, train=False)


def test_cli_reference_protocol_results_name_their_protocol(folder_set, tiny_open_clip, tmp_path):
    common = ["evaluate", "--open-clip", "protoclip-tiny", "--pretrained", str(tiny_open_clip), "--dataset", "folder",
              "--root", str(folder_set), "--workers", "0", "--workspace", str(tmp_path / "ws")]
    for task in ("linear-probe", "clustering"):
        assert _cli(*common, "--task", task).exit_code == 0
        result = _cli(*common, "--task", task, "--protocol", "reference")
        assert result.exit_code == 0, result.output
    eval_dir = tmp_path / "ws" / "eval" / "protoclip-tiny-tiny.pt"
    default = json.loads((eval_dir / "linear-probe-folder.json").read_text())
    reference = json.loads((eval_dir / "linear-probe-reference-folder.json").read_text())
    assert (default["protocol"], default["features"], default["method"]) == ("default", "normalised", "lbfgs")
    assert (reference["protocol"], reference["features"], reference["method"]) == ("reference", "raw", "sgd")
    per_epoch = reference["test_top1_per_epoch"]
    assert reference["epochs"] == len(per_epoch) == 100
    assert reference["metrics"]["top1"] == max(per_epoch) == per_epoch[reference["best_epoch"] - 1]
    # Its plot is the test top-1 per epoch (the default probe's: validation top-1 per weight decay).
    assert reference["plots"] == [str(eval_dir / "linear-probe-reference-folder.png")]
    assert default["plots"] == [str(eval_dir / "linear-probe-folder.png")]
    assert all(Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in reference["plots"] + default["plots"])
    clusters = json.loads((eval_dir / "clustering-folder.json").read_text())
    clusters_ref = json.loads((eval_dir / "clustering-reference-folder.json").read_text())
    assert (clusters["protocol"], clusters["iterations"], clusters["restarts"]) == ("default", 50, 3)
    assert (clusters_ref["protocol"], clusters_ref["iterations"], clusters_ref["restarts"]) == ("reference", 100, 5)
    manifest = json.loads((eval_dir / "manifest.json").read_text())
    assert {"linear-probe-folder", "linear-probe-reference-folder", "clustering-reference-folder"} <= set(manifest["results"])
