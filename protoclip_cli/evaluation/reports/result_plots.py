"""The plots of ``evaluate``'s results, written next to each result's JSON and listed in its record.

``<result>.png``: the zero-shot top-k curve, the linear probe's validation top-1 per weight decay
(``--protocol reference``: its test top-1 per epoch),
retrieval recall@k both ways, or the zero-shot suite's top-1 per data set with their mean.
``<result>-tsne.png``: t-SNE of (a seeded sample of) the image features coloured by true class and
by zero-shot prediction (a class keeps its colour in both panels) or k-means cluster.
``<result>-samples.png``: images with their true and predicted class (green when right, red when
wrong). Figures are drawn by :mod:`protoclip_cli.evaluation.reports.plots`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from protoclip_cli.data.transforms import eval_transform
from protoclip_cli.evaluation.data.image_set import ImageSet
from protoclip_cli.evaluation.reports import plots
from protoclip_cli.evaluation.tasks.retrieval import retrieval_recall

SAMPLES = 16


class ResultPlots:
    """Draws the plots of one ``evaluate`` call; t-SNE maps of the same data are computed once."""

    def __init__(self, model_name: str, image_size, tsne_points: int, seed: int) -> None:
        self.model_name, self.image_size, self.tsne_points, self.seed = model_name, image_size, tsne_points, seed
        self._maps: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def write(self, stem: Path, task: str, result: dict, data: ImageSet | None, figures: dict) -> list[Path]:
        """The plots of one result (``stem`` = the JSON's path without ``.json``)."""
        title = f"{self.model_name} {stem.name}"
        written = []
        if task == "zeroshot":
            curve = result["topk_curve"]
            written.append(plots.curves_png(stem.with_suffix(".png"), {"top-k": ([int(k) for k in curve], list(curve.values()))},
                                            "k", "accuracy (%)", f"{title}: zero-shot top-k accuracy"))  # fmt: skip
            predicted = figures["scores"].argmax(dim=1).numpy()
            written += self._tsne(stem, data, figures, {"class": figures["labels"], "zero-shot prediction": predicted}, title,
                                  shared_colours=True)
            written.append(self._samples(stem, data, figures["labels"], predicted, title))
        elif task == "linear-probe" and result.get("protocol") == "reference":
            per_epoch = result["test_top1_per_epoch"]
            written.append(plots.curves_png(
                stem.with_suffix(".png"), {"test top-1": (list(range(1, len(per_epoch) + 1)), per_epoch)}, "epoch",
                "top-1 (%)", f"{title}: reference linear probe (best {result['metrics']['top1']:.2f})",
                marks={"best epoch": result["best_epoch"]},
            ))  # fmt: skip
        elif task == "linear-probe":
            decays = sorted(result["validation_top1"], key=float)
            written.append(plots.curves_png(
                stem.with_suffix(".png"), {"validation top-1": ([float(d) for d in decays], [result["validation_top1"][d] for d in decays])},
                "weight decay", "top-1 (%)", f"{title}: linear probe (test top-1 {result['metrics']['top1']:.2f})",
                log_x=True, marks={"chosen": result["weight_decay"]},
            ))  # fmt: skip
        elif task == "retrieval":
            ks = list(range(1, min(50, data.size) + 1))
            recall = retrieval_recall(figures["features"], figures["captions"], figures["owners"], ks=ks)
            written.append(plots.curves_png(
                stem.with_suffix(".png"),
                {direction.replace("_", " "): (ks, [100 * recall[f"{direction}_R@{k}"] for k in ks])
                 for direction in ("image_to_text", "text_to_image")},
                "k", "recall@k (%)", f"{title}: retrieval",
            ))  # fmt: skip
        elif task == "clustering":
            written += self._tsne(stem, data, figures, {"class": figures["labels"], "k-means cluster": figures["clusters"]}, title)
        elif task == "zeroshot-suite":
            top1 = {m["suite"]: m["metrics"]["top1"] for m in result["members"] if m["task"] == "zeroshot"}
            if top1:
                written.append(plots.bars_png(stem.with_suffix(".png"), top1, "zero-shot top-1 (%)",
                                              f"{title}: zero-shot suite", mean_label="mean"))  # fmt: skip
        return written

    def _tsne(self, stem: Path, data: ImageSet, figures: dict, colourings: dict, title: str,
              shared_colours: bool = False) -> list[Path]:
        if self.tsne_points <= 0 or data.size < 5:
            return []
        if data.fingerprint not in self._maps:
            rows = np.sort(np.random.default_rng(self.seed).permutation(data.size)[: self.tsne_points])
            self._maps[data.fingerprint] = (rows, plots.tsne_points(figures["features"][rows].numpy(), self.seed))
        rows, points = self._maps[data.fingerprint]
        path = stem.parent / f"{stem.name}-tsne.png"
        return [plots.tsne_png(path, np.empty(0), {k: np.asarray(v)[rows] for k, v in colourings.items()}, self.seed,
                               f"{title}: t-SNE of {len(rows)} image features", points=points,
                               shared_colours=shared_colours)]  # fmt: skip

    def _samples(self, stem: Path, data: ImageSet, labels: np.ndarray, predicted: np.ndarray, title: str) -> Path:
        """The first images of ``data`` with their true and predicted class."""
        dataset = data.images(eval_transform(self.image_size))
        if isinstance(dataset, torch.utils.data.IterableDataset):
            shown = [item for _, item in zip(range(SAMPLES), dataset)]
        else:
            shown = [dataset[row] for row in range(min(SAMPLES, len(dataset)))]
        names = data.classnames
        texts = [f"{names[labels[row]]}\n-> {names[predicted[row]]}" for row, _ in shown]
        colours = ["tab:green" if labels[row] == predicted[row] else "tab:red" for row, _ in shown]
        return plots.labelled_grid_png(stem.parent / f"{stem.name}-samples.png", [image for _, image in shown], texts,
                                       f"{title}: true -> zero-shot prediction", colours)  # fmt: skip
