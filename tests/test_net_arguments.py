"""`train_feature_net` / `train_anomaly_net`: an image size the net cannot pool, a learning rate that is not a
finite number > 0, and a run whose loss stops being finite are one line and exit code 2, and write no file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import user_error

from tools.features import FeatureNet
from tools.net_files import smallest_image_size
from tools.train_anomaly_net import main as train_anomaly_net
from tools.train_feature_net import main as train_feature_net
from tools.transform_net import TransformNet

COMMANDS = {"train_feature_net": train_feature_net, "train_anomaly_net": train_anomaly_net}


def args_for(command: str, shapes: Path, out: Path, *extra: str) -> list[str]:
    """A 3-step run on 16-px shapes (one net for the anomaly net), then `extra`."""
    members = ["--members", "1"] if command == "train_anomaly_net" else []
    return ["--data.dataset", "image_folder", "--data.root", str(shapes), "--data.image_size", "16",
            "--data.batch_size", "8", "--steps", "3", *members, "--log_every", "0", "--device", "cpu",
            "--out", str(out), *extra]  # fmt: skip


@pytest.mark.parametrize("net", [FeatureNet(), TransformNet()], ids=["feature_net", "anomaly_net"])
def test_smallest_image_size_is_what_the_net_takes(net) -> None:
    """Two 2x max-poolings: 4 -> 2 -> 1 runs, 3 -> 1 -> 0 is torch's "Output size is too small"."""
    assert smallest_image_size(net) == 4
    net.eval()(torch.zeros(2, 1, 4, 4))
    with pytest.raises(RuntimeError, match="Output size is too small"):
        net(torch.zeros(2, 1, 3, 3))


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("size", [1, 3])
def test_image_size_the_net_cannot_pool(command, size, shapes_folder, tmp_path: Path, capsys) -> None:
    args = args_for(command, shapes_folder, tmp_path / "net.pt", "--data.image_size", str(size))
    assert user_error(COMMANDS[command], args, capsys) == (
        f"{command}: error: --data.image_size must be >= 4 for this net (its max-poolings divide the side by 4), "
        f"got {size}"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(("lr", "shown"), [("-1", "-1.0"), ("0", "0.0"), ("1e999", "inf")])
def test_lr_not_a_finite_number_above_0(command, lr, shown, shapes_folder, tmp_path: Path, capsys) -> None:
    args = args_for(command, shapes_folder, tmp_path / "net.pt", "--lr", lr)
    expected = f"{command}: error: --lr must be a finite number > 0, got {shown}"
    assert user_error(COMMANDS[command], args, capsys) == expected
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", COMMANDS)
def test_diverged_run_writes_nothing_and_keeps_the_old_file(command, shapes_folder, tmp_path: Path, capsys) -> None:
    """lr 1e30: weights of about 1e30 after one step, a loss of NaN at the next; the --overwrite target stays."""
    out = tmp_path / "net.pt"
    out.write_bytes(b"the old net")
    args = args_for(command, shapes_folder, out, "--lr", "1e30", "--overwrite")
    assert user_error(COMMANDS[command], args, capsys) == (
        f"{command}: error: training diverged at step 2 of 3 (loss nan); lower --lr (now 1e+30)"
    )
    assert list(tmp_path.iterdir()) == [out] and out.read_bytes() == b"the old net"


@pytest.mark.parametrize(("lr", "steps", "why"), [
    ("1e38", "3", "step 1 of 3 (the update overflowed)"),  # 1e38 / Adam's first bias correction 0.1 > float32
    ("1e308", "1", "step 1 of 1 (the weights are not finite)"),  # the last update, after the last loss
])  # fmt: skip
def test_diverged_update(lr, steps, why, shapes_folder, tmp_path: Path, capsys) -> None:
    args = args_for("train_feature_net", shapes_folder, tmp_path / "net.pt", "--lr", lr, "--steps", steps)
    assert user_error(train_feature_net, args, capsys) == (
        f"train_feature_net: error: training diverged at {why}; lower --lr (now {float(lr):g})"
    )
    assert list(tmp_path.iterdir()) == []
