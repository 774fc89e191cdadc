"""Image features for FID/KID: a small classifier the project trains itself, or Inception-v3.

    features = load_features("runs/feature_net/fashion_mnist.pt", device)   # or "inception", or "auto"
    feats = features(uint8_images)            # (N, C, H, W) uint8 -> (N, D) float64 numpy
    features.label  ->  "Fashion-MNIST classifier features"   (goes into "FID (...)")

Inception-v3 pool3 features (the "real" FID) need torch-fidelity and its weights, downloaded once; offline,
``train_feature_net`` trains :class:`FeatureNet` on the dataset's train split and saves it with its
test accuracy, and its 128-d penultimate layer is the feature space. Such an FID is only comparable with
FIDs computed with the same file, and is never to be presented as Inception FID: every label says
which features were used. The feature-net file is a plain ``torch.save`` dict (weights_only-loadable):
format, version, arch, state_dict, dataset, data options, image_size, channels, class_names,
test_accuracy, steps.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.cli import UserError
from common.images import from_uint8
from tools.net_files import DEFAULT_SIZES, dataset_key, fit_classifier, load_net_file, rebuilding, save_net_file

FORMAT = "vqgen-feature-net"
VERSION = 1
DEFAULT_DIR = Path("runs") / "feature_net"
DATASET_NAMES = {"fashion_mnist": "Fashion-MNIST", "mnist": "MNIST", "cifar10": "CIFAR-10"}
INCEPTION_LABEL = "Inception-v3 pool3"


class FeaturesError(UserError, ValueError):
    """Features cannot be loaded or do not fit the images; the message says what to do."""


def default_path(dataset: str, root: str | None = None, image_size: int | None = None) -> Path:
    """Where `train_feature_net` saves, and `evaluate` looks, by default: runs/feature_net/<dataset>.pt, and
    for an image folder runs/feature_net/image_folder_<folder name>.pt (each folder is its own data set);
    at another size than the data's default, <...>_<size>px.pt (a net reads one size)."""
    return DEFAULT_DIR / f"{dataset_key(dataset, root, image_size)}.pt"


def _train_command(dataset: str, root: str | None = None, image_size: int | None = None) -> str:
    size = f" --data.image_size {image_size}" if image_size and image_size != DEFAULT_SIZES.get(dataset) else ""
    return (f"train_feature_net --data.dataset {dataset} " + (f"--data.root {root}" if root else "[--data.root DIR]")
            + size)


# ------------------------------------------------------------------------------------------ network
class FeatureNet(nn.Module):
    """A small CNN classifier; ``features`` (its penultimate layer) is the embedding used for FID/KID."""

    def __init__(self, channels: int = 1, num_classes: int = 10, width: int = 32, feature_dim: int = 128) -> None:
        super().__init__()

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.body = nn.Sequential(
            *conv(channels, width), nn.MaxPool2d(2),  # (B, w, H/2, W/2)
            *conv(width, 2 * width), nn.MaxPool2d(2),  # (B, 2w, H/4, W/4)
            *conv(2 * width, 2 * width), nn.AdaptiveAvgPool2d(4), nn.Flatten(),  # (B, 2w * 16)
            nn.Linear(2 * width * 16, feature_dim),  # (B, feature_dim): the features
        )  # fmt: skip
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(feature_dim, num_classes))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) in [-1, 1] -> (B, feature_dim)."""
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(images))  # (B, num_classes) logits


@torch.no_grad()
def accuracy(net: FeatureNet, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy on uint8 images (N, C, H, W)."""
    net.eval()
    device = next(net.parameters()).device
    correct = 0
    for start in range(0, len(images), batch_size):
        x = from_uint8(images[start : start + batch_size].to(device)).contiguous(memory_format=torch.channels_last)
        correct += int((net(x).argmax(1).cpu() == labels[start : start + batch_size]).sum())
    return correct / max(1, len(images))


def fit_feature_net(
    net: FeatureNet, images: torch.Tensor, labels: torch.Tensor, steps: int, batch_size: int = 128,
    lr: float = 3e-3, seed: int = 0, log_every: int = 0,
) -> list[float]:  # fmt: skip
    """Train on uint8 images (N, C, H, W) with labels (N,) for `steps` steps (AdamW, warm-up + cosine,
    random shifts of up to 2 px as augmentation); returns the loss of every step."""
    if len(images) < batch_size:
        raise ValueError(f"the train split has {len(images)} images, fewer than batch_size={batch_size}")
    device = next(net.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    order, pos = torch.randperm(len(images), generator=gen), 0

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal order, pos
        if pos + batch_size > len(order):
            order, pos = torch.randperm(len(images), generator=gen), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        x = from_uint8(images[idx].to(device))  # (B, C, H, W) in [-1, 1]
        dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
        x = torch.roll(F.pad(x, (2, 2, 2, 2), value=-1.0), (dy, dx), (2, 3))[:, :, 2:-2, 2:-2]
        return x, labels[idx].to(device)

    return fit_classifier(net, next_batch, steps, batch_size, lr, log_every)


# ------------------------------------------------------------------------------------------ file
def save_feature_net(net: FeatureNet, path: str | Path, **info: Any) -> Path:
    """Write the net, its architecture and `info` (dataset, data, image_size, channels, class_names,
    test_accuracy, steps) to `path`, atomically (temp file + rename)."""
    arch = {"channels": net.body[0].in_channels, "num_classes": net.head[-1].out_features,
            "width": net.body[0].out_channels, "feature_dim": net.head[-1].in_features}  # fmt: skip
    return save_net_file(path, FORMAT, VERSION, arch, net, **info)


def load_feature_net(path: str | Path) -> tuple[FeatureNet, dict[str, Any]]:
    """(FeatureNet in eval mode on CPU, the file's record without the weights), or FeaturesError."""
    record = load_net_file(path, FORMAT, VERSION, "feature-net", _train_command("DATASET"), FeaturesError)
    with rebuilding(path, FeaturesError, _train_command("DATASET")):
        net = FeatureNet(**record["arch"])
        net.load_state_dict(record["state_dict"])
    return net.eval(), {k: v for k, v in record.items() if k != "state_dict"}


# ------------------------------------------------------------------------------------------ extractors
class Features:
    """Callable: uint8 images (N, C, H, W) -> features (N, D) float64, computed in batches on `device`.

    ``label`` names the feature space in metric names ("FID (<label>)"); ``description`` adds details
    (file, test accuracy); ``image_shape`` (C, H, W) is what the images must be, or None for any.
    ``num_classes``: a feature net's classes (its head turns features into them: ``top1``), 0 for Inception.
    """

    def __init__(self, net: nn.Module, label: str, description: str, image_shape: tuple[int, int, int] | None,
                 device: torch.device, inception: bool = False, batch_size: int = 500) -> None:  # fmt: skip
        self.net, self.label, self.description = net.to(device).eval(), label, description
        self.image_shape, self.device, self.inception, self.batch_size = image_shape, device, inception, batch_size
        self.num_classes = 0 if inception else int(net.head[-1].out_features)

    @torch.no_grad()
    def top1(self, features: np.ndarray) -> np.ndarray | None:
        """The class a feature net's head gives features (N, D) that __call__ returned (N,), or None (Inception).
        Exactly the net's own prediction: the features are its body's float32 output, held as float64."""
        if not self.num_classes:
            return None
        x = torch.from_numpy(features).float()
        out = [self.net.head(x[i : i + self.batch_size].to(self.device)).argmax(1).cpu()
               for i in range(0, len(x), self.batch_size)]  # fmt: skip
        return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)

    @torch.no_grad()
    def probabilities(self, features: np.ndarray) -> np.ndarray | None:
        """The class probabilities (N, K) a feature net's head gives features (N, D), or None (Inception)."""
        if not self.num_classes:
            return None
        x = torch.from_numpy(features).float()
        out = [self.net.head(x[i : i + self.batch_size].to(self.device)).float().softmax(1).cpu()
               for i in range(0, len(x), self.batch_size)]  # fmt: skip
        return torch.cat(out).double().numpy() if out else np.zeros((0, self.num_classes))

    def check(self, images: torch.Tensor, what: str) -> None:
        shape = tuple(images.shape[1:])
        if self.image_shape is not None and shape != self.image_shape:
            c, h, w = self.image_shape
            raise FeaturesError(
                f"{what} are {shape[1]}x{shape[2]} with {shape[0]} channel(s), but the {self.description} expect "
                f"{h}x{w} with {c}; train a feature net on these images ({_train_command('DATASET')} "
                "--data.image_size ... --out FILE) and pass --features FILE"
            )

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, what: str = "the images") -> np.ndarray:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise FeaturesError(f"{what}: expected uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        self.check(images, what)
        out = []
        for start in range(0, len(images), self.batch_size):
            x = images[start : start + self.batch_size].to(self.device)
            if self.inception:  # torch-fidelity's Inception takes uint8 RGB and resizes to 299 itself
                out.append(self.net(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x).reshape(len(x), -1))
            else:
                out.append(self.net.features(from_uint8(x).contiguous(memory_format=torch.channels_last)))
        return torch.cat(out).double().cpu().numpy()


def feature_net_features(path: str | Path, device: torch.device, folder: str | None = None) -> Features:
    """Features of a feature-net file; `folder`: the image folder it must have been trained on (the default
    file of a folder is found by the folder's name, and one trained on another folder of that name would
    silently measure the wrong data set)."""
    net, info = load_feature_net(path)
    trained_on = (info.get("data") or {}).get("root")
    if folder is not None and (trained_on is None or Path(str(trained_on)).resolve() != Path(folder).resolve()):
        raise FeaturesError(
            f"{path} was trained on the image folder {trained_on}, not on --data.root {folder}: train one on this "
            f"folder (`{_train_command('image_folder', folder)} --out FILE`) and pass --features FILE"
        )
    name = DATASET_NAMES.get(info.get("dataset"), f"{info.get('dataset', 'custom')} dataset")
    if info.get("dataset") == "image_folder":
        name = f"image-folder '{Path(str(info.get('data', {}).get('root'))).name}'"
    acc = info.get("test_accuracy", float("nan"))
    label = f"{name} classifier features"
    shape = (int(info["channels"]), int(info["image_size"]), int(info["image_size"]))
    return Features(net, label, f"{label} (test acc {acc:.3f}, {path})", shape, device)


def inception_features(device: torch.device) -> Features:
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3

        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"])
    except Exception as e:  # torch-fidelity missing (ModuleNotFoundError), weights not downloadable (URLError)...
        raise FeaturesError(
            f"Inception-v3 features are unavailable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            "They need `pip install torch-fidelity` and, once, network access to download the weights. "
            f"Offline, train the project's own feature net ({_train_command('DATASET')}) and pass --features FILE"
        ) from e
    return Features(net, INCEPTION_LABEL, f"{INCEPTION_LABEL} features (torch-fidelity weights)", None, device,
                    inception=True)  # fmt: skip


def missing_features_message(dataset: str, root: str | None = None, image_size: int | None = None) -> str:
    """What to run (or pass) when no features exist for `dataset` (at `root`, at `image_size`)."""
    path = default_path(dataset, root, image_size)
    return (f"{path} does not exist and Inception-v3 needs torch-fidelity. Train the project's feature net first: "
            f"`{_train_command(dataset, root, image_size)}` (about 2 minutes on a CPU; it saves to {path}), or pass "
            "--features FILE / --features inception")  # fmt: skip


def load_features(spec: str | None, dataset: str, device: torch.device | str = "cpu",
                  optional: bool = False, root: str | None = None, image_size: int | None = None,
                  ) -> Features | None:  # fmt: skip
    """`spec`: a feature-net file, "inception", or "auto"/None = :func:`default_path` of `dataset` (and, for an
    image folder, its `root`; at `image_size`) if it exists, else Inception if torch-fidelity is installed, else a
    FeaturesError saying to run train_feature_net (None instead when `optional`: the caller goes on without FID)."""
    device = torch.device(device)
    if spec == "inception":
        return inception_features(device)
    if spec not in (None, "", "auto"):
        if Path(spec).is_dir():  # was "does not exist; train one with ... --out DIR", which would fail too
            raise FeaturesError(f"--features {spec} is a directory; pass a feature-net file (.pt), inception or auto")
        return feature_net_features(spec, device)
    path = default_path(dataset, root, image_size)
    if path.is_file():
        return feature_net_features(path, device, root if dataset == "image_folder" and root else None)
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        if optional:
            return None
        raise FeaturesError(f"no features for FID/KID: {missing_features_message(dataset, root, image_size)}") from None
    print(f"no {path}: using Inception-v3 features (torch-fidelity)", file=sys.stderr)
    return inception_features(device)
