"""`evaluate --task zeroshot-suite`: the reference's zero-shot data sets read from small fakes in the
layouts torchvision, CLIP_benchmark and the reference use, each with its own class names and
templates (no network; a random-weight OpenCLIP checkpoint of the tiny architecture stands in for
a model)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from protoclip_cli.evaluation.data import prompts, suite_layouts

torch.set_num_threads(2)
RNG = np.random.default_rng(0)
WNIDS = ("n01440764", "n01443537", "n02123045")  # tench (0), goldfish (1), tabby cat (281)
UCF = ("ApplyEyeMakeup", "Archery", "YoYo")


def _image(path: Path, size: int = 20, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 255, (size, size + 4, 3), dtype=np.uint8)).save(path, fmt)
    return path


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _webp(size: int = 20) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(RNG.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, "WEBP")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def suite_root(tmp_path_factory) -> Path:
    from scipy.io import savemat

    root = tmp_path_factory.mktemp("suite")
    # ImageNet: wnid folders under val/ (torchvision's ImageNet folder, our --imagenet-root layout).
    for wnid in WNIDS:
        _image(root / "imagenet" / "val" / wnid / f"{wnid}_1.JPEG", fmt="JPEG")
    # CIFAR-10 as CLIP_benchmark's webdataset (clip-benchmark/wds_vtab-cifar10), labels 0, 3, 9.
    wds = root / "wds_vtab-cifar10"
    (wds / "test").mkdir(parents=True)
    (wds / "test" / "nshards.txt").write_text("1\n")
    (wds / "classnames.txt").write_text("\n".join(prompts.classes_and_templates("cifar10")[0]) + "\n")
    with tarfile.open(wds / "test" / "0.tar", "w") as tar:
        for i, label in enumerate((0, 3, 9)):
            _tar_member(tar, f"s{i:04d}.webp", _webp())
            _tar_member(tar, f"s{i:04d}.cls", f"{label}\n".encode())
    # Birdsnap as the reference's class folders, numbered from 0 (its empty classes removed).
    for folder in ("000", "002", "499"):
        _image(root / "birdsnap" / "test" / folder / "a.jpg", fmt="JPEG")
    # Country211 as torchvision stores it: one folder per ISO code, sorted = class order.
    codes = [f"{chr(65 + i // 26)}{chr(65 + i % 26)}" for i in range(211)]
    for code in codes:  # torchvision's ImageFolder refuses empty class folders
        _image(root / "country211" / "test" / code / "x.jpg", 12, "JPEG")
    # Flowers102 as torchvision's Flowers102 reads it: setid.mat / imagelabels.mat (1-based).
    flowers = root / "flowers-102"
    labels = np.array([1, 102, 5, 102], dtype=np.uint8)
    flowers.mkdir()
    savemat(flowers / "imagelabels.mat", {"labels": labels})
    savemat(flowers / "setid.mat", {"trnid": np.array([1]), "valid": np.array([3]), "tstid": np.array([2, 3])})
    for image_id in range(1, 5):
        _image(flowers / "jpg" / f"image_{image_id:05d}.jpg", fmt="JPEG")
    # GTSRB as torchvision's GTSRB reads it: PPM images named by GT-final_test.csv.
    gtsrb = root / "gtsrb"
    rows = [("00000.ppm", 42), ("00001.ppm", 0)]
    for name, _ in rows:
        _image(gtsrb / "GTSRB" / "Final_Test" / "Images" / name, fmt="PPM")
    (gtsrb / "GT-final_test.csv").write_text(
        "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"
        + "".join(f"{name};24;20;1;1;20;18;{label}\n" for name, label in rows)
    )
    # Stanford Cars as torchvision's StanfordCars reads it (1-based classes).
    cars = root / "stanford_cars"
    (cars / "devkit").mkdir(parents=True)
    savemat(cars / "devkit" / "cars_meta.mat", {"class_names": np.array(prompts.classes_and_templates("stanford_cars")[0], dtype=object)})
    annotations = np.array([(1, 1, 10, 10, 196, "00001.jpg"), (1, 1, 10, 10, 1, "00002.jpg")],
                           dtype=[("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"), ("class", "O"), ("fname", "O")])
    savemat(cars / "cars_test_annos_withlabels.mat", {"annotations": annotations})
    for name in ("00001.jpg", "00002.jpg"):
        _image(cars / "cars_test" / name, fmt="JPEG")
    # UCF101 middle frames as the reference's class folders, named in CamelCase.
    for name in UCF:
        _image(root / "ucf101" / "testlist01" / name / "frame.jpg", fmt="JPEG")
    # COCO val2017 as the reference keeps it (coco2017/).
    coco = root / "coco2017"
    images = [{"id": i, "file_name": f"{i:012d}.jpg"} for i in (1, 2, 3)]
    for image in images:
        _image(coco / "val2017" / image["file_name"], fmt="JPEG")
    captions = [{"image_id": i, "id": 10 * i + j, "caption": f"picture {i} caption {j}"} for i in (1, 2, 3) for j in (1, 2)]
    (coco / "annotations").mkdir(parents=True)
    (coco / "annotations" / "captions_val2017.json").write_text(json.dumps({"images": images, "annotations": captions}))
    return root


def _names(data) -> list[str]:
    return [data.classnames[label] for label in data.labels]


def test_each_layout_reads_with_the_data_sets_own_classes_and_templates(suite_root):
    found = {name: suite_layouts.find(suite_root, name) for name in suite_layouts.SUITE}
    assert found["cifar100"] is None and found["stl10"] is None
    layouts = {name: data.details["layout"] for name, data in found.items() if data is not None}
    assert layouts == {
        "imagenet": "ImageNet wnid folders", "cifar10": "CLIP_benchmark webdataset", "birdsnap": "class folders",
        "country211": "class folders", "flowers102": "torchvision", "gtsrb": "torchvision", "stanford_cars": "torchvision",
        "ucf101": "class folders", "coco": "COCO val2017",
    }
    assert sorted(_names(found["imagenet"])) == ["goldfish", "tabby cat", "tench"] and len(found["imagenet"].classnames) == 1000
    assert _names(found["cifar10"]) == ["airplane", "cat", "truck"]
    assert found["cifar10"].templates[0] == "a photo of a {}." and len(found["cifar10"].templates) == 18
    # Birdsnap: folders 000, 002, 499 of the 500 names; only classes with images are candidates.
    assert found["birdsnap"].classnames == ["Acadian Flycatcher", "Alder Flycatcher", "Zone tailed Hawk"]
    assert found["birdsnap"].templates == ["a photo of a {}, a type of bird."]
    country = _names(found["country211"])  # sorted codes = the classes in order: Andorra (AD) ... Zimbabwe (ZW)
    assert len(country) == 211 and (country[0], country[-1]) == ("Andorra", "Zimbabwe")
    # Test ids 2 and 3 have the 1-based labels 102 and 5: the last and the fifth class.
    assert _names(found["flowers102"]) == ["blackberry lily", "english marigold"] and len(found["flowers102"].classnames) == 102
    assert found["flowers102"].templates == ["a photo of a {}, a type of flower."]
    gtsrb = prompts.classes_and_templates("gtsrb")[0]
    assert _names(found["gtsrb"]) == [gtsrb[42], "red and white circle 20 kph speed limit"]
    assert _names(found["stanford_cars"]) == ["smart fortwo Convertible 2012", "AM General Hummer SUV 2000"]
    assert _names(found["ucf101"]) == ["Apply Eye Makeup", "Archery", "Yo Yo"] and len(found["ucf101"].templates) == 48
    assert found["coco"].captions[0] == ["picture 1 caption 1", "picture 1 caption 2"]


def test_torchvision_layouts_read_as_torchvision_reads_them(suite_root):
    """Where torchvision's own class accepts the fake (no checksum), it finds the same files and labels."""
    import torchvision

    for name, torchvision_set in (("gtsrb", torchvision.datasets.GTSRB(str(suite_root), split="test")),
                                  ("stanford_cars", torchvision.datasets.StanfordCars(str(suite_root), split="test"))):
        data = suite_layouts.find(suite_root, name)
        ours = [(path, int(label)) for (path, _, _), label in zip(data.images(lambda image: image).sources, data.labels)]
        assert ours == [(str(Path(p)), t) for p, t in torchvision_set._samples], name
    country = torchvision.datasets.Country211(str(suite_root), split="test")
    data = suite_layouts.find(suite_root, "country211")
    ours = [(path, int(label)) for (path, _, _), label in zip(data.images(lambda image: image).sources, data.labels)]
    assert ours == country.samples and data.classnames == prompts.classes_and_templates("country211")[0]
    image = data.images(lambda image: image)[0][1]
    assert image.dtype == torch.uint8 and image.shape == (3, 12, 16)
    ppm = suite_layouts.find(suite_root, "gtsrb").images(lambda image: image)[0][1]  # PPM, decoded by PIL
    assert ppm.shape == (3, 20, 24)


def test_suite_names_and_templates_are_clip_benchmarks_where_it_ships_them():
    import clip_benchmark
    import open_clip

    folder = Path(clip_benchmark.__file__).parent / "datasets"
    names = json.loads((folder / "en_classnames.json").read_text())
    templates = json.loads((folder / "en_zeroshot_classification_templates.json").read_text())
    ours = {"flowers": "flowers102", "gtsrb": "gtsrb", "country211": "country211", "cars": "stanford_cars",
            "cifar10": "cifar10", "cifar100": "cifar100", "stl10": "stl10"}
    for theirs, name in ours.items():
        classes, ours_templates = prompts.classes_and_templates(name)
        if theirs in names:
            assert classes == names[theirs], name
        assert ours_templates == [t.replace("{c}", "{}") for t in templates[theirs]], name
    assert prompts.classes_and_templates("imagenet")[0] == names["imagenet1k"] == list(open_clip.IMAGENET_CLASSNAMES)
    assert [prompts.prompts_source(n) for n in ("imagenet", "cifar10", "gtsrb", "birdsnap")] == [
        "open_clip", "protoclip_cli.evaluation.data.prompts", "clip_benchmark", "zeroshot_suite.json"]


def test_without_clip_benchmark_the_bundled_lists_are_the_same(monkeypatch):
    shipped = {name: prompts.classes_and_templates(name) for name in suite_layouts.CLASSIFICATION}
    monkeypatch.setattr(prompts, "_clip_benchmark", lambda: None)
    assert {name: prompts.classes_and_templates(name) for name in suite_layouts.CLASSIFICATION} == shipped
    assert prompts.prompts_source("flowers102") == "zeroshot_suite.json"


def _cli(*args: str):
    from typer.testing import CliRunner

    from protoclip_cli.cli import app

    return CliRunner().invoke(app, list(args))


# ImageNet's 80,000 prompts would dominate a CPU test: its layout is read above, its zero-shot
# evaluation is tested in test_evaluate_data.py.
CHOSEN = ("cifar10", "birdsnap", "country211", "flowers102", "gtsrb", "stanford_cars", "ucf101", "coco")


def test_zeroshot_suite_gives_one_table_one_mean_and_clip_benchmark_records(suite_root, tiny_open_clip, tmp_path):
    out = tmp_path / "eval"
    out.mkdir()  # an existing folder: the result is written into it
    choice = [arg for name in CHOSEN for arg in ("--suite-datasets", name)]
    result = _cli("evaluate", "--open-clip", "protoclip-tiny", "--pretrained", str(tiny_open_clip), "--task",
                  "zeroshot-suite", "--root", str(suite_root), *choice, "--workers", "0", "--device", "cpu",
                  "--out", str(out), "--workspace", str(tmp_path / "ws"))
    assert result.exit_code == 0, result.output
    record = json.loads((out / "zeroshot-suite.json").read_text())
    members = {m["suite"]: m for m in record["members"]}
    assert record["missing"] == [] and list(members) == list(CHOSEN)
    top1 = [members[n]["metrics"]["top1"] for n in members if n != "coco"]
    assert record["metrics"]["mean_top1"] == pytest.approx(np.mean(top1), abs=1e-4)
    assert record["metrics"]["coco_mean_recall"] == members["coco"]["metrics"]["mean_recall"]
    assert {k for k in record["metrics"] if k.endswith("_top1")} == {f"{n}_top1" for n in members if n != "coco"} | {"mean_top1"}
    assert (members["birdsnap"]["classes"], members["birdsnap"]["templates"]) == (3, 1)
    assert (members["flowers102"]["classes"], members["flowers102"]["templates"]) == (102, 1)
    assert members["flowers102"]["prompts"] == "clip_benchmark" and members["ucf101"]["prompts"] == "zeroshot_suite.json"
    assert (members["ucf101"]["classes"], members["ucf101"]["templates"]) == (3, 48)  # class folders: those present
    assert members["coco"]["images"] == 3 and members["coco"]["captions"] == 6
    assert "mean_top1" in result.stdout
    assert record["plots"] == [str(out / "zeroshot-suite.png")] and str(out / "zeroshot-suite.png") in result.output
    with Image.open(out / "zeroshot-suite.png") as bars:
        assert bars.format == "PNG" and bars.size[0] > bars.size[1]
    benchmark = {json.loads(p.read_text())["dataset"]: json.loads(p.read_text()) for p in (out / "clip_benchmark").glob("*.json")}
    assert set(benchmark) == {"cifar10", "birdsnap-test", "country211", "flowers", "gtsrb", "cars", "ucf101-test",
                              "coco-val2017"}
    assert benchmark["cars"]["task"] == "zeroshot_classification"
    assert benchmark["cars"]["metrics"]["acc1"] == pytest.approx(members["stanford_cars"]["metrics"]["top1"] / 100)
    assert benchmark["coco-val2017"]["task"] == "zeroshot_retrieval"


def test_the_mean_covers_what_is_found_and_the_rest_is_named(tiny_open_clip, tmp_path):
    root = tmp_path / "root"
    for folder in ("000", "001"):
        _image(root / "birdsnap" / "test" / folder / "a.jpg", fmt="JPEG")
    result = _cli("evaluate", "--open-clip", "protoclip-tiny", "--pretrained", str(tiny_open_clip), "--task",
                  "zeroshot-suite", "--root", str(root), "--workers", "0", "--device", "cpu", "--out", str(tmp_path / "suite.json"),
                  "--workspace", str(tmp_path / "ws"))
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "suite.json").read_text())  # --out FILE: the result goes there
    assert record["plots"] == [str(tmp_path / "suite.png")]
    assert record["missing"] == [n for n in suite_layouts.SUITE if n != "birdsnap"]
    assert "Not under" in result.output and "the mean covers the 1 data set(s) found" in " ".join(result.output.split())
    assert record["metrics"]["mean_top1"] == record["metrics"]["birdsnap_top1"] in (0.0, 50.0, 100.0)


@pytest.mark.parametrize("args, message", [
    (["--task", "zeroshot-suite"], "--task zeroshot-suite needs --root"),
    (["--task", "zeroshot-suite", "--root", "{empty}"], "No data set of the zero-shot suite is under"),
    (["--task", "zeroshot-suite", "--root", "{suite}", "--suite-datasets", "stl10"], "Suite data set stl10 is not under"),
    (["--task", "zeroshot-suite", "--root", "{suite}", "--suite-datasets", "mnist"], "--suite-datasets mnist is not one of"),
])
def test_suite_errors_are_one_sentence(suite_root, tiny_open_clip, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    args = [a.replace("{empty}", str(tmp_path / "empty")).replace("{suite}", str(suite_root)) for a in args]
    result = _cli("evaluate", "--open-clip", "protoclip-tiny", "--pretrained", str(tiny_open_clip), *args,
                  "--workers", "0", "--device", "cpu", "--workspace", str(tmp_path / "ws"))
    assert result.exit_code == 1 and message in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output
