"""A transformation classifier for one-class anomaly detection: the ``transform_knn`` score of `score_anomalies`.

    model, losses = AnomalyNet.train(normal_uint8_images, members=2, steps=1000)   # two nets, their banks
    scores = model.score(images)                                   # (N,) higher = more anomalous
    model.save("runs/anomaly_net/mine.pt"); model = AnomalyNet.load("runs/anomaly_net/mine.pt")

    # one net by hand
    net = TransformNet(channels=1)
    fit_transform_net(net, normal_uint8_images, steps=1000)          # learn to tell 72 transformations apart
    bank = reference_features(net, normal_uint8_images)               # (M, D) unit vectors of the normal images
    scores = knn_distance(image_features(net, images), bank, k=5)     # (N,) higher = more anomalous
    # the mirror view: features of the mirrored images against a bank of the mirrored normal images
    mirrored = knn_distance(image_features(net, images, view=36), reference_features(net, normal_uint8_images, view=36))

The net never sees a label or an anomaly. It is trained, on the normal images only, to say which of 72
geometric transformations (mirrored or not x shifted by 0 / -s / +s pixels across x 0 / -s / +s down x
turned by 0 / 90 / 180 / 270 degrees, s = a quarter of the side) was applied to an image (Golan and
El-Yaniv 2018, "Deep anomaly detection using geometric transformations"). To tell an upside-down shirt
from an upright one, or one shifted left from one shifted right, it has to learn what a shirt looks like:
its features describe the normal class in detail. An image is then scored by the mean cosine distance of
its features to its k nearest normal training images (deep k-NN, as in Bergman et al. 2020): near zero for
an image like the training images, large for one the features place elsewhere. `AnomalyNet` scores two
views of each image, the image and its mirror image, each against the bank of the normal images seen the
same way, and averages the distances over views and over independently seeded nets (two by default). Both
averages were chosen on a validation split of the training images (README): two nets raised the mean
one-class AUROC from 0.9518 (one net, mean of two seeds) to 0.9542, the mirror view to 0.9550 and the
lowest class (Shirt) from 0.8722 to 0.8734; adding the quarter turns (8 views) gave 0.9552 but Shirt 0.8700.
On one-class Fashion-MNIST (T-shirt, Shirt, Bag; a throwaway comparison
with 90 s of training each, README) GeoTrans's own score, the mean log-probability of the right
transformation over all 72, reached AUROC 0.893 / 0.798 / 0.972 and this k-NN score 0.940 / 0.844 / 0.974,
at 1/72 of the scoring cost.

Shifts fill the uncovered border by repeating the edge pixels, so black (Fashion-MNIST) and white (emoji)
backgrounds both stay plain. Images are square in this project, so quarter turns are always defined.
The file ``train_anomaly_net`` writes is a plain ``torch.save`` dict (weights_only-loadable): format,
version (3), arch, views, members (a state_dict and a (views, M, D) bank for each net), k, image_size,
channels, dataset, data options, classes, steps, seconds. Version-1 (one net) and version-2 files (an
(M, D) bank per net) still load and score the untransformed view only, as they did.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.cli import UserError
from common.images import from_uint8
from tools.net_files import dataset_key, fit_classifier, load_net_file, rebuilding, save_net_file, state_dict_cpu

FORMAT = "vqgen-anomaly-net"
VERSION = 3  # 1: one net, 2: no views (both still read)
DEFAULT_DIR = Path("runs") / "anomaly_net"
NUM_TRANSFORMS = 72  # 2 mirror states x 3 x-shifts x 3 y-shifts x 4 quarter turns
K = 5  # neighbours transform_knn averages over (train_anomaly_net --k; kept in the file)
MEMBERS = 2  # independently seeded nets whose scores transform_knn averages (train_anomaly_net --members)
VIEWS = (0, 36)  # transformations scored, each against its own bank: the image and its mirror image


class AnomalyNetError(UserError, ValueError):
    """An anomaly-net file cannot be loaded or does not fit the images; the message says what to do."""


def default_path(dataset: str, root: str | None = None, image_size: int | None = None) -> Path:
    """Where `train_anomaly_net` saves by default: runs/anomaly_net/<dataset>.pt (an image folder:
    image_folder_<folder name>.pt, another size than the data's <...>_<size>px.pt, as the feature net's)."""
    return DEFAULT_DIR / f"{dataset_key(dataset, root, image_size)}.pt"


# ------------------------------------------------------------------------------------------ transformations
def _shift(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """x (B, C, S, S) moved dx pixels right and dy down, the uncovered border filled with the edge pixels."""
    if dx == 0 and dy == 0:
        return x
    s = x.shape[-1]
    p = max(abs(dx), abs(dy))
    padded = F.pad(x, (p, p, p, p), mode="replicate")  # (B, C, S + 2p, S + 2p)
    return padded[..., p - dy : p - dy + s, p - dx : p - dx + s]


def transform(images: torch.Tensor, index: int) -> torch.Tensor:
    """images (B, C, S, S) -> the same images under transformation `index` in [0, 72); 0 is the identity."""
    flip, rest = divmod(int(index), 36)
    tx, rest = divmod(rest, 12)
    ty, turns = divmod(rest, 4)
    s = max(1, images.shape[-1] // 4)
    x = images.flip(-1) if flip else images
    x = _shift(x, (0, -s, s)[tx], (0, -s, s)[ty])
    return x.rot90(turns, (-2, -1)) if turns else x


def transform_each(images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """images (B, C, S, S), indices (B,) -> image i under transformation indices[i] (B, C, S, S)."""
    out = torch.empty_like(images)
    for t in indices.unique().tolist():
        rows = (indices == t).nonzero().squeeze(1)
        out[rows] = transform(images[rows], t)
    return out


# ------------------------------------------------------------------------------------------ network
class TransformNet(nn.Module):
    """Six 3x3 conv + BatchNorm + ReLU layers in three stages (width, 2 width, 4 width channels, halving the
    resolution between stages), global average pooling -> the features (4 width), a linear layer -> the
    logits of the 72 transformations."""

    def __init__(self, channels: int = 1, width: int = 32, num_transforms: int = NUM_TRANSFORMS) -> None:
        super().__init__()

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        w = width
        self.body = nn.Sequential(
            *conv(channels, w), *conv(w, w), nn.MaxPool2d(2),  # (B, w, S/2, S/2)
            *conv(w, 2 * w), *conv(2 * w, 2 * w), nn.MaxPool2d(2),  # (B, 2w, S/4, S/4)
            *conv(2 * w, 4 * w), *conv(4 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(),  # (B, 4w)
        )  # fmt: skip
        self.head = nn.Linear(4 * w, num_transforms)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(images))  # (B, 72) logits


def fit_transform_net(net: TransformNet, images: torch.Tensor, steps: int, batch_size: int = 128,
                      lr: float = 2e-3, seed: int = 0, log_every: int = 0) -> list[float]:  # fmt: skip
    """Train on the normal uint8 images (N, C, S, S) for `steps` steps: each step draws `batch_size` images
    and one random transformation for each, and teaches the net which one it was (AdamW, warm-up +
    cosine). Returns every step's loss."""
    if len(images) < 2:
        raise ValueError(f"the anomaly net needs at least 2 normal images, got {len(images)}")
    device = next(net.parameters()).device
    gen = torch.Generator().manual_seed(seed)

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(images), (batch_size,), generator=gen)
        target = torch.randint(0, NUM_TRANSFORMS, (batch_size,), generator=gen)
        return transform_each(from_uint8(images[idx]), target).to(device), target.to(device)  # (B, C, S, S), (B,)

    return fit_classifier(net, next_batch, steps, batch_size, lr, log_every)


@torch.no_grad()
def image_features(net: TransformNet, images: torch.Tensor, batch_size: int = 500, view: int = 0) -> torch.Tensor:
    """images (N, C, S, S), uint8 or in [-1, 1] -> unit feature vectors (N, 4 width) on the CPU, float32, of
    the images under transformation `view` (0: as they are)."""
    net.eval()
    device = next(net.parameters()).device
    out = []
    for x in images.split(batch_size):
        x = from_uint8(x) if x.dtype == torch.uint8 else x
        x = transform(x.float().to(device), view).contiguous(memory_format=torch.channels_last)
        out.append(F.normalize(net.body(x).float(), dim=1).cpu())
    return torch.cat(out) if out else torch.zeros(0, net.head.in_features)


def reference_features(net: TransformNet, images: torch.Tensor, max_images: int = 20000, seed: int = 0,
                       view: int = 0) -> torch.Tensor:  # fmt: skip
    """The k-NN bank of one view: (M, D) features of the normal images under transformation `view` (a seeded
    random `max_images` of them if there are more; the same images for every view and seed)."""
    if len(images) > max_images:
        images = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:max_images]]
    return image_features(net, images, view=view)


def knn_distance(features: torch.Tensor, bank: torch.Tensor, k: int = K, chunk: int = 1024) -> np.ndarray:
    """features (N, D) and bank (M, D), unit vectors -> (N,) mean cosine distance to the k nearest in the bank."""
    k = min(k, len(bank))
    out = []
    for f in features.split(chunk):
        nearest = (f.float() @ bank.float().T).topk(k, dim=1).values  # (n, k) cosine similarities
        out.append((1.0 - nearest).mean(1).clamp(min=0.0))
    return torch.cat(out).double().numpy() if out else np.zeros(0)


# ------------------------------------------------------------------------------------------ the score
class AnomalyNet:
    """One or more trained nets, each with a k-NN bank per view: ``score(images)`` -> (N,) ``transform_knn`` for
    images in [-1, 1], the mean over nets and views of the k-NN distances (an ensemble of independently seeded
    nets: on a validation split of the training images one net's one-class AUROC moved by up to 0.01 a class
    from seed to seed, and two nets averaged beat the mean of the two single nets on all 10 classes, README).
    ``AnomalyNet.train(...)`` trains one; ``AnomalyNet.load(path, device)`` reads a `train_anomaly_net` file.
    A bank is (views, M, D), or (M, D) for the untransformed view alone."""

    def __init__(self, nets: list[TransformNet], banks: list[torch.Tensor], k: int, image_size: int,
                 source: str = "the net", views: tuple[int, ...] = (0,)) -> None:  # fmt: skip
        if not nets or len(nets) != len(banks):
            raise ValueError(f"an anomaly net needs one bank per net, got {len(nets)} nets, {len(banks)} banks")
        banks = [(b.unsqueeze(0) if b.dim() == 2 else b).float() for b in banks]  # each (V, M, D)
        if any(len(b) != len(views) for b in banks) or not all(0 <= int(t) < NUM_TRANSFORMS for t in views):
            raise ValueError(f"an anomaly net needs one bank per view {tuple(views)}, got {[len(b) for b in banks]}")
        self.nets, self.banks, self.views = [n.eval() for n in nets], banks, tuple(int(t) for t in views)
        self.k, self.source = int(k), source
        self.info: dict[str, Any] = {}  # what the file says besides the weights (load fills it)
        self.shape = (nets[0].body[0].in_channels, int(image_size), int(image_size))

    @classmethod
    def train(cls, images: torch.Tensor, members: int = MEMBERS, steps: int = 1000, width: int = 32,
              batch_size: int = 128, lr: float = 2e-3, seed: int = 0, k: int = K, device: str | torch.device = "cpu",
              log_every: int = 0, views: tuple[int, ...] = VIEWS) -> tuple[AnomalyNet, list[list[float]]]:  # fmt: skip
        """Train `members` nets on the normal uint8 images (N, C, S, S), net i from seed `seed` + i whatever
        ran before, and bank their features in each of `views`: (the model, each net's losses)."""
        nets, banks, losses = [], [], []
        for i in range(members):
            torch.manual_seed(seed + i)
            net = TransformNet(images.shape[1], width).to(device)
            losses.append(fit_transform_net(net, images, steps, batch_size, lr, seed + i, log_every))
            nets.append(net)
            # the same reference images for every net and view: (V, M, D)
            banks.append(torch.stack([reference_features(net, images, seed=seed, view=t) for t in views]))
        return cls(nets, banks, k, images.shape[-1], views=views), losses

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu", what: str = "--anomaly_net",
             fits: tuple[int, int] | None = None) -> AnomalyNet:  # fmt: skip
        """Read the file; with `fits` = (channels, image_size) of the models it will score beside, refuse a
        net trained on other images."""
        train = "train_anomaly_net --data.dataset ..."  # what the refusals tell the user to run
        record = load_net_file(path, FORMAT, (1, 2, VERSION), "anomaly-net", train, AnomalyNetError, what)
        with rebuilding(path, AnomalyNetError, train, what):
            # version 1 (one net): its weights and bank at the top level
            members = record["members"] if record["version"] >= 2 else [record]
            nets = []
            for member in members:
                net = TransformNet(**record["arch"])
                net.load_state_dict(member["state_dict"])
                nets.append(net.to(device))
            # versions 1 and 2: an (M, D) bank of the untransformed images
            views = tuple(record.get("views", (0,)))
            model = cls(nets, [m["bank"] for m in members], record.get("k", K), record["image_size"],
                        f"{what} {path}", views)  # fmt: skip
        model.info = {key: v for key, v in record.items() if key not in ("members", "state_dict", "bank")}
        if fits is not None:
            model.check(*fits)
        return model

    def save(self, path: str | Path, **info: Any) -> Path:
        """Write the nets, their architecture, their banks, k, the image size, channels and `info` to `path`,
        atomically (temp file + rename)."""
        net = self.nets[0]
        arch = {"channels": net.body[0].in_channels, "width": net.body[0].out_channels,
                "num_transforms": net.head.out_features}  # fmt: skip
        members = [{"state_dict": state_dict_cpu(n), "bank": b.cpu().contiguous()}
                   for n, b in zip(self.nets, self.banks)]  # fmt: skip
        c, s, _ = self.shape
        return save_net_file(path, FORMAT, VERSION, arch, None, views=list(self.views), members=members, k=self.k,
                             image_size=s, channels=c, **info)  # fmt: skip

    def check(self, channels: int, image_size: int) -> None:
        """Refuse models whose images differ from the net's (one line: what each is, what to do)."""
        if (channels, image_size, image_size) != self.shape:
            c, s, _ = self.shape
            raise AnomalyNetError(
                f"{self.source} was trained on {s}x{s} images with {c} channel(s), the models score "
                f"{image_size}x{image_size} with {channels}; train it on the same images (train_anomaly_net)"
            )

    def view_scores(self, images: torch.Tensor) -> np.ndarray:
        """Every net's k-NN distances in every view: (nets, views, N)."""
        return np.array([[knn_distance(image_features(net, images, view=t), bank[v], self.k)
                          for v, t in enumerate(self.views)] for net, bank in zip(self.nets, self.banks)])  # fmt: skip

    def score(self, images: torch.Tensor) -> np.ndarray:
        return self.view_scores(images).mean((0, 1))  # (N,)
