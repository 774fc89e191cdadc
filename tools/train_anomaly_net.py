"""`train_anomaly_net`: train the transformation classifier behind `score_anomalies --anomaly_net`.

    train_anomaly_net --data.dataset image_folder --data.root normal_parts/ --data.image_size 64
    train_anomaly_net --data.dataset fashion_mnist --classes 0 --out runs/anomaly_net/tshirt.pt   # one class
    score_anomalies new/ --prior PRIOR.ckpt --anomaly_net runs/anomaly_net/image_folder_normal_parts.pt --out s.csv

Give it the normal images only (a folder of them, or the classes of a labelled data set named by
``--classes``): it learns which of 72 mirrorings, shifts and quarter turns was applied to each (no labels, no
anomalies needed) and keeps the features of those images, as they are and mirrored, as the reference for the
``transform_knn`` score (see :mod:`tools.transform_net`). It saves the net, the references, the image size and
channels and the data options to ``--out`` (default ``runs/anomaly_net/<dataset>.pt``; an image folder:
``image_folder_<folder name>.pt``), atomically, and never overwrites without ``--overwrite``. It trains
``--members`` (default 2) independently seeded nets and the score averages them; each net's default 1,000
steps of 128 images take about 1.5 minutes on a 2-core CPU at 28 px (``--members 1`` halves the time for a
slightly noisier score).
"""

from __future__ import annotations

import time

import torch

from common.cli import UserError, at_least, make_parser, parse_classes, run_command
from common.splits import ImageSplits
from tools.net_files import add_training_options, smallest_image_size, start_training
from tools.transform_net import MEMBERS, AnomalyNet, K, TransformNet, default_path


def build_parser():
    parser = make_parser("train_anomaly_net", __doc__)
    parser.add_argument("--classes", type=str, default=None,
                        help="the normal classes, comma-separated ids or names (default: every training image)")
    parser.add_argument("--k", type=int, default=K, help="neighbours the transform_knn score averages over")
    parser.add_argument("--members", type=int, default=MEMBERS,
                        help="independently seeded nets whose scores transform_knn averages (1 is twice as fast)")
    add_training_options(parser, lr=2e-3, kind="anomaly_net", overwrite="an existing --out file")
    return parser


def normal_images(dm: ImageSplits, classes: str | None) -> tuple[torch.Tensor, list[int] | None]:
    """The training images of the normal classes (uint8 (N, C, S, S)) and those classes (None: all)."""
    images, labels = dm.split_arrays("train")
    if classes is None:
        return images, None
    wanted = sorted(parse_classes(classes, dm.class_names))
    keep = torch.isin(labels, torch.tensor(wanted))
    return images[keep], wanted


def run(cfg) -> str:
    at_least(1, k=cfg.k, members=cfg.members)
    out, device, dm = start_training(cfg, default_path, smallest_image_size(TransformNet()))
    images, classes = normal_images(dm, cfg.classes)
    if len(images) < 2:
        raise UserError(f"--classes {cfg.classes}: only {len(images)} training image(s); the net needs at least 2")
    print(f"training an anomaly net ({cfg.members} x {cfg.steps} steps) on {len(images)} normal images of "
          f"{dm.options.dataset} on {device}", flush=True)  # fmt: skip
    t0 = time.perf_counter()
    model, losses = AnomalyNet.train(images, cfg.members, cfg.steps, cfg.width, dm.options.batch_size, cfg.lr,
                                     cfg.seed, cfg.k, device, cfg.log_every)  # fmt: skip
    seconds = time.perf_counter() - t0
    final = [sum(x[-50:]) / len(x[-50:]) for x in losses]
    model.save(out, dataset=dm.options.dataset, data=vars(dm.options), classes=classes, steps=cfg.steps,
               train_seconds=round(seconds, 1), final_loss=final)  # fmt: skip
    return (f"trained {cfg.members} net(s) in {seconds:.0f}s (final loss {', '.join(f'{x:.3f}' for x in final)}), "
            f"{model.banks[0].shape[1]} reference images, {len(model.views)} views; saved to {out}")


def _run(args: list[str] | None) -> str:
    return run(build_parser().parse_args(args))


def main(args: list[str] | None = None) -> None:
    run_command("train_anomaly_net", _run, args, memory_flag=None)


if __name__ == "__main__":
    main()
