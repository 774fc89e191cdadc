"""How far samples are from the real test images, in a feature net's space: FID, KID, precision and recall beside
their real-data floors, the class mix's distance from the test split's, and the classifier's class agreement and
score (the Inception Score's formula with the feature net's classifier). `evaluate samples` prints them
(:mod:`tools.evaluate`); the benchmarks call them directly.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from common.codes import class_counts
from common.splits import ImageSplits
from tools.features import Features
from tools.fid import classifier_score, fid, kid, precision_recall

KID_SUBSET = 1000
PR_NEIGHBOURS = 3  # k of precision/recall's balls, as LlamaGen's and ADM's evaluators


def class_mix_distance(labels: np.ndarray, test_labels: np.ndarray) -> float | None:
    """Total variation between the samples' class proportions and the test split's (0: the same mix, 1: no
    class in common); None without labels on both sides. A feature net trained on the classes separates
    them, so FID grows with this: emoji's test split is 62 % "People & Body", classes in turn give it 11 %."""
    if len(labels) == 0 or (labels < 0).any() or not (test_labels >= 0).any():
        return None
    k = int(max(labels.max(), test_labels.max())) + 1
    p, q = (np.array(class_counts(x, k)) for x in (labels, test_labels))  # the test split's unlabelled skipped
    return float(np.abs(p / p.sum() - q / q.sum()).sum() / 2)


def evaluate_samples(samples: torch.Tensor, dm: ImageSplits, features: Features, seed: int = 0,
                     kid_subsets: int = 100, labels: np.ndarray | None = None) -> dict[str, Any]:  # fmt: skip
    features.check(samples, "the samples")
    (test, test_labels), train = dm.split_arrays("test"), dm.split_arrays("train")[0]
    if tuple(test.shape[1:]) != tuple(samples.shape[1:]):
        raise ValueError(f"the samples are {tuple(samples.shape[1:])} but the {dm.options.dataset} test images are "
                         f"{tuple(test.shape[1:])} (C, H, W); pass the --data.* options of stage 1")  # fmt: skip
    n = len(samples)
    pick = np.sort(np.random.default_rng(seed).choice(len(train), min(n, len(train)), replace=False))
    f_test, f_samples = features(test, "the test images"), features(samples, "the samples")
    f_floor = features(train[torch.from_numpy(pick)], "the train subset")
    subset = min(KID_SUBSET, n, len(test))
    kid_s, kid_f = kid(f_samples, f_test, kid_subsets, subset, seed), kid(f_floor, f_test, kid_subsets, subset, seed)
    mix = class_mix_distance(labels, test_labels.numpy()) if labels is not None else None
    # precision/recall on sets of one size (they depend on it): the test split cut to the samples' number
    m, rng = min(n, len(f_test), len(f_floor)), np.random.default_rng(seed)

    def cut(x: np.ndarray) -> np.ndarray:  # m rows at random (samples come sorted by class)
        return x[np.sort(rng.choice(len(x), m, replace=False))]

    real, fake, floor = cut(f_test), cut(f_samples), cut(f_floor)
    pr = pr_floor = (None, None)
    if m > PR_NEIGHBOURS:
        pr, pr_floor = precision_recall(real, fake, PR_NEIGHBOURS), precision_recall(real, floor, PR_NEIGHBOURS)
    return {"samples": n, "test_images": len(test), "floor_train_images": len(pick), "fid": fid(f_samples, f_test),
            "fid_floor": fid(f_floor, f_test), "kid": kid_s[0], "kid_std": kid_s[1], "kid_floor": kid_f[0],
            "kid_floor_std": kid_f[1], "kid_subset_size": subset, "features": features.description,
            "precision": pr[0], "recall": pr[1], "precision_floor": pr_floor[0], "recall_floor": pr_floor[1],
            "precision_recall_size": m, "precision_recall_k": PR_NEIGHBOURS, "class_mix_distance": mix,
            **class_score(features, f_samples, f_test),
            **class_agreement(features, f_samples, labels, f_test, test_labels.numpy())}  # fmt: skip


def class_score(features: Features, f_samples: np.ndarray, f_test: np.ndarray) -> dict[str, Any]:
    """The Inception Score's formula with the feature net's classifier, of the samples and (the floor) of the
    test images, over 10 splits as the Inception Score is (fewer for fewer images); None with Inception features
    (torch-fidelity's give no classes here)."""
    p_samples, p_test = features.probabilities(f_samples), features.probabilities(f_test)
    if p_samples is None or not len(p_samples) or not len(p_test):
        return {"class_score": None, "class_score_std": None, "class_score_floor": None, "class_score_floor_std": None}
    score, std = classifier_score(p_samples, min(10, len(p_samples)))
    floor, floor_std = classifier_score(p_test, min(10, len(p_test)))
    return {"class_score": score, "class_score_std": std, "class_score_floor": floor,
            "class_score_floor_std": floor_std}  # fmt: skip


def class_agreement(features: Features, f_samples: np.ndarray, labels: np.ndarray | None, f_test: np.ndarray,
                    test_labels: np.ndarray) -> dict[str, Any]:  # fmt: skip
    """How often the feature net's classifier names the class each sample was drawn for, beside how often it
    names the test images' own classes (its accuracy: the floor). None where there is nothing to compare: no
    labels (unconditional samples, a folder), Inception features, or classes the net does not know."""
    none = {"class_agreement": None, "class_agreement_floor": None, "class_agreement_per_class": None}
    known = test_labels >= 0
    if labels is None or not features.num_classes or not known.any() or labels.max() >= features.num_classes:
        return none
    said, said_test = features.top1(f_samples), features.top1(f_test[known])
    per_class = [float((said[labels == c] == c).mean()) if (labels == c).any() else None
                 for c in range(features.num_classes)]  # fmt: skip
    return {"class_agreement": float((said == labels).mean()),
            "class_agreement_floor": float((said_test == test_labels[known]).mean()),
            "class_agreement_per_class": per_class}  # fmt: skip


def samples_rows(r: dict[str, Any], label: str) -> list[tuple[str, str, str]]:
    rows = [(f"FID ({label})", f"{r['fid']:.3f}", f"{r['fid_floor']:.3f}"),
            (f"KID ({label})", f"{r['kid']:.5f} ± {r['kid_std']:.5f}",
             f"{r['kid_floor']:.5f} ± {r['kid_floor_std']:.5f}")]  # fmt: skip
    if r.get("precision") is not None:
        rows += [(f"precision ({label}, k={r['precision_recall_k']})", f"{r['precision']:.3f}",
                  f"{r['precision_floor']:.3f}"),
                 (f"recall ({label}, k={r['precision_recall_k']})", f"{r['recall']:.3f}", f"{r['recall_floor']:.3f}")]
    if r.get("class_score") is not None:  # the floor: the test images' own score
        rows.append(("classifier score (the Inception Score's formula, this classifier)",
                     f"{r['class_score']:.3f} ± {r['class_score_std']:.3f}",
                     f"{r['class_score_floor']:.3f} ± {r['class_score_floor_std']:.3f}"))  # fmt: skip
    if r.get("class_agreement") is not None:  # the floor: the classifier's accuracy on the test images
        rows.append(("class agreement (the classifier names the class drawn)", f"{r['class_agreement']:.3f}",
                     f"{r['class_agreement_floor']:.3f}"))  # fmt: skip
    return rows
