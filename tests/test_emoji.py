"""Emoji on generated files of the real layout (emoji.json + img/<vendor>/64/*.png): compositing over white,
category labels, and splits by base emoji (the fetcher: test_emoji_fetch.py). Never the network."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common import emoji
from common.readers import DatasetNotFoundError
from common.splits import ImageSplits

ENTRIES = [  # (name, category, image stem, skin-tone variant stems, vendors with an image)
    ("GRINNING FACE", "Smileys & Emotion", "1f600", [], ("apple", "google")),
    ("WAVING HAND SIGN", "People & Body", "1f44b", ["1f44b-1f3fb", "1f44b-1f3ff"], ("apple", "google")),
    ("EMOJI MODIFIER FITZPATRICK TYPE-1-2", "Component", "1f3fb", [], ("apple", "google")),
    ("FLAG IN HOLE", "Activities", "26f3", [], ("apple",)),
    ("PIZZA", "Food & Drink", "1f355", [], ("apple", "google")),
    ("CAT FACE", "Animals & Nature", "1f431", [], ("apple", "google")),
]


def glyph(seed: int) -> Image.Image:
    """64x64 RGBA: transparent, with one opaque coloured square."""
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[16:48, 16:48] = [(seed * 40) % 256, 100, 200, 255]
    return Image.fromarray(rgba, "RGBA")


def write_emoji(root: Path) -> Path:
    entries = []
    for i, (name, category, stem, variants, vendors) in enumerate(ENTRIES):
        has = {f"has_img_{v}": v in vendors for v in emoji.VENDORS}
        skin = {f"1F3F{k}": {"image": f"{s}.png", **has} for k, s in enumerate(variants)}
        entries.append({"name": name, "category": category, "image": f"{stem}.png", **has,
                        **({"skin_variations": skin} if skin else {})})  # fmt: skip
        for vendor in vendors:
            folder = root / "img" / vendor / "64"
            folder.mkdir(parents=True, exist_ok=True)
            for j, s in enumerate([stem, *variants]):
                glyph(i * 7 + j).save(folder / f"{s}.png")
    (root / "emoji.json").write_text(json.dumps(entries))
    return root


@pytest.fixture
def emoji_root(tmp_path: Path) -> Path:
    return write_emoji(tmp_path / "emoji")


def test_load_composites_over_white_with_category_labels(emoji_root):
    arrays = emoji.load_emoji(emoji_root, 64)
    # apple: 1 + 3 + 1 + 1 + 1 = 7 glyphs, google: 1 + 3 + 1 + 1 = 6; the Component entry is dropped
    assert arrays.images.shape == (13, 64, 64, 3) and arrays.images.dtype == np.uint8
    assert arrays.class_names == ["Activities", "Animals & Nature", "Food & Drink", "People & Body",
                                  "Smileys & Emotion"]  # fmt: skip
    assert (arrays.images[:, 0, 0] == 255).all()  # transparent corners became white
    assert not (arrays.images[:, 32, 32] == 255).all(axis=1).any()  # the opaque square kept its colour
    waving = [i for i, n in enumerate(arrays.names) if n == "WAVING HAND SIGN"]
    assert len(waving) == 6 and set(arrays.labels[waving]) == {3} and len(set(arrays.groups[waving])) == 1
    assert sorted(set(arrays.vendors)) == ["apple", "google"]
    assert emoji.load_emoji(emoji_root, 32).images.shape == (13, 32, 32, 3)
    with pytest.raises(ValueError, match="64 or 32 px"):
        emoji.load_emoji(emoji_root, 28)


def test_splits_hold_whole_base_emoji(emoji_root):
    groups = emoji.load_emoji(emoji_root).groups
    index = emoji.group_split(groups, 1, 1, seed=0)
    assert sorted(np.concatenate(list(index.values())).tolist()) == list(range(len(groups)))
    seen = [set(groups[index[s]].tolist()) for s in ("train", "val", "test")]
    assert all(len(a & b) == 0 for a in seen for b in seen if a is not b)  # no base emoji in two splits
    assert len(seen[1]) == len(seen[2]) == 1
    assert {k: v.tolist() for k, v in emoji.group_split(groups, 1, 1, seed=0).items()} == {
        k: v.tolist() for k, v in index.items()}  # fmt: skip
    with pytest.raises(ValueError, match="leave none to train on"):
        emoji.group_split(groups, 3, 2, seed=0)


def test_image_splits_read_emoji(emoji_root):
    data = ImageSplits("emoji", root=str(emoji_root), val_size=1, test_size=1)
    assert (data.image_size, data.channels, data.num_classes) == (64, 3, 5)
    sizes = {s: len(data.split_arrays(s)[1]) for s in ("train", "val", "test")}
    assert sum(sizes.values()) == 13 and min(sizes.values()) >= 1
    assert data.split_arrays("test")[0].shape[1:] == (3, 64, 64)
    small = ImageSplits("emoji", root=str(emoji_root), image_size=32, channels=1, val_size=1, test_size=1)
    assert small.split_arrays("train")[0].shape[1:] == (1, 32, 32)
    with pytest.raises(ValueError, match="image_size must be None, 64 or 32"):
        ImageSplits("emoji", root=str(emoji_root), image_size=48)


def test_missing_emoji_says_how_to_get_them(tmp_path, monkeypatch):
    with pytest.raises(DatasetNotFoundError, match="make data-emoji") as info:
        ImageSplits("emoji", root=str(tmp_path / "nothing")).split_arrays("train")
    assert "relative to" not in str(info.value)
    # a relative root (as a checkpoint keeps it, typed in another directory) says where it was looked for
    monkeypatch.chdir(tmp_path)
    for dataset, missing in (("emoji", "nothing/emoji.json"), ("image_folder", "nothing")):
        with pytest.raises(DatasetNotFoundError) as info:
            ImageSplits(dataset, root="nothing").split_arrays("train")
        assert f"{missing} (relative to the current directory {tmp_path})" in str(info.value), str(info.value)
    (tmp_path / "glyphs").mkdir()
    (tmp_path / "glyphs" / "emoji.json").write_text("[]")
    with pytest.raises(DatasetNotFoundError) as info:
        ImageSplits("emoji", root="glyphs").split_arrays("train")
    assert f"no <vendor>/64 folder in glyphs/img (relative to the current directory {tmp_path})" in str(info.value)


def test_the_default_root_is_found_from_another_directory(tmp_path, monkeypatch):
    """Emoji's default root, data/emoji, is relative: a stage-1 checkpoint keeps where it was at training time,
    and a later command run from another directory reads the glyphs there (common.splits.data_options)."""
    from common.datamodule import ImageDataModule
    from common.splits import data_options

    write_emoji(tmp_path / "project" / "data" / "emoji")
    monkeypatch.chdir(tmp_path / "project")
    dm = ImageDataModule("emoji", val_size=1, test_size=1)  # --data.root not given: data/emoji
    saved = dict(dm.hparams)
    assert saved["root"] is None and saved["resolved_root"] == str(tmp_path / "project" / "data" / "emoji")
    want = dm.split_arrays("test")[0]
    monkeypatch.chdir(tmp_path)  # no data/emoji here
    assert data_options(saved)["root"] == saved["resolved_root"]
    assert torch.equal(ImageSplits(**data_options(saved)).split_arrays("test")[0], want)
    (tmp_path / "data" / "emoji").mkdir(parents=True)  # one here is the one meant (and says what is missing)
    assert data_options(saved)["root"] is None
