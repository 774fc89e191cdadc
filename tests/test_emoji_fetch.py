"""The emoji fetcher (`python -m common.emoji DIR`, what `make data-emoji` runs) with a stand-in npm that copies
generated tarballs of the real layout: what it extracts, that it replaces nothing of the user's, that a killed
fetch leaves nothing outside DIR and nothing a rerun keeps, and that the reader refuses a fetch stopped
part-way. Never the network."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common import emoji
from common.cli import UserError
from common.readers import DatasetError

REPO = Path(__file__).resolve().parents[1]
ENTRIES = [{"name": name, "category": category, "image": image, **{f"has_img_{v}": True for v in emoji.VENDORS}}
           for name, category, image in (("PIZZA", "Food & Drink", "1f355.png"),
                                         ("CAT FACE", "Animals & Nature", "1f431.png"))]  # fmt: skip
GLYPHS = sorted(e["image"] for e in ENTRIES)


def png(seed: int) -> bytes:
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[16:48, 16:48] = [(seed * 40) % 256, 100, 200, 255]
    out = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(out, format="PNG")
    return out.getvalue()


def fake_package(vendor: str) -> bytes:
    """A tarball laid out like npm's (emoji.json is the same in every vendor's, as in the real ones), with a
    path-traversal member and a sprite sheet that must never be extracted."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("package/emoji.json", json.dumps(ENTRIES).encode())
        for i, name in enumerate(GLYPHS):
            add(f"package/img/{vendor}/64/{name}", png(emoji.VENDORS.index(vendor) * 3 + i))
        add(f"package/img/{vendor}/64/../../../../escaped.png", png(9))
        add(f"package/img/{vendor}/sheets/big.png", png(9))
    return buf.getvalue()


@pytest.fixture
def npm(tmp_path: Path, monkeypatch) -> Path:
    """A stand-in `npm` first on PATH: `npm pack NAME@VERSION` copies NAME's stored tarball into the current
    directory and logs that directory; a `kill-after-NAME` file makes it SIGKILL its caller once copied."""
    store = tmp_path / "npm_store"
    store.mkdir()
    for vendor in emoji.VENDORS:
        tarball = fake_package(vendor)
        (store / f"emoji-datasource-{vendor}.tgz").write_bytes(tarball)
        monkeypatch.setitem(emoji.TARBALL_SHA256, vendor, hashlib.sha256(tarball).hexdigest())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "npm"
    script.write_text(f'#!/bin/sh\nname="${{2%@*}}"\npwd >> "{store}/cwds.txt"\n'
                      f'cp "{store}/$name.tgz" "$name-{emoji.VERSION}.tgz"\n'
                      f'if [ -f "{store}/kill-after-$name" ]; then kill -KILL $PPID; fi\n')  # fmt: skip
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return script


def fetched(root: Path) -> set[str]:
    """What a finished fetch leaves in `root`, and nothing else."""
    return {"emoji.json", "img", *(f".{v}-{emoji.VERSION}.ok" for v in emoji.VENDORS)}


def test_fetch_checks_the_tarball_extracts_only_glyphs_in_root_and_is_idempotent(npm, tmp_path, monkeypatch, capsys):
    root = tmp_path / "data" / "emoji"
    monkeypatch.setitem(emoji.TARBALL_SHA256, "google", "0" * 64)
    with pytest.raises(UserError, match="SHA-256 is not the pinned one"):
        emoji.fetch(root, ("google",))
    assert list(root.iterdir()) == []  # nothing extracted, and the download was removed
    monkeypatch.setitem(emoji.TARBALL_SHA256, "google", hashlib.sha256(fake_package("google")).hexdigest())
    emoji.fetch(root)
    assert set(os.listdir(root)) == fetched(root)
    for vendor in emoji.VENDORS:
        assert sorted(p.name for p in (root / "img" / vendor / "64").iterdir()) == GLYPHS
    assert not list(tmp_path.rglob("escaped.png")) and not (root / "img" / "google" / "sheets").exists()
    # every download went to a hidden folder of the root (a killed one is cleared by the next run), not /tmp
    cwds = (tmp_path / "npm_store" / "cwds.txt").read_text().split()
    assert cwds == [str(root / ".fetch-google.tmp"), *(str(root / f".fetch-{v}.tmp") for v in emoji.VENDORS)]
    assert emoji.load_emoji(root).images.shape == (8, 64, 64, 3)
    capsys.readouterr()
    emoji.fetch(root)
    assert capsys.readouterr().out.count("already in") == 4 and set(os.listdir(root)) == fetched(root)


def test_a_users_folder_or_emoji_json_is_refused_and_kept(npm, tmp_path, capsys):
    root = tmp_path / "emoji"
    mine = root / "img" / "apple" / "64"
    mine.mkdir(parents=True)
    (mine / "NOTES.txt").write_text("my notes\n")
    (mine / "my_drawing.png").write_bytes(png(5))
    with pytest.raises(SystemExit) as info:
        emoji.main([str(root)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"{mine} exists but was not fetched by `make data-emoji`" in err and "move it away" in err
    assert (mine / "NOTES.txt").read_text() == "my notes\n" and (mine / "my_drawing.png").read_bytes() == png(5)
    assert sorted(os.listdir(root)) == ["img"]  # no marker, no emoji.json, no download left
    # a folder of exactly the package's glyphs plus one of the user's files is the user's too
    shutil.rmtree(mine)
    emoji.fetch(root)
    (root / "img" / "google" / "64" / "extra.png").write_bytes(png(6))
    (root / f".google-{emoji.VERSION}.ok").unlink()
    with pytest.raises(UserError, match="img/google/64 exists but was not fetched"):
        emoji.fetch(root)
    assert (root / "img" / "google" / "64" / "extra.png").read_bytes() == png(6)
    # an emoji.json of the user's is not replaced either
    other = tmp_path / "other"
    other.mkdir()
    (other / "emoji.json").write_text("[]")
    with pytest.raises(UserError, match=f"{other / 'emoji.json'} exists but is not the emoji.json of"):
        emoji.fetch(other)
    assert (other / "emoji.json").read_text() == "[]" and sorted(os.listdir(other)) == ["emoji.json"]


def test_an_exact_copy_without_markers_is_kept_and_marked_and_an_empty_folder_filled(npm, tmp_path, capsys):
    """`cp -r img` of a fetch loses the hidden markers; its files are the package's, so the fetch marks them
    as they are (the same bytes: nothing to replace) instead of refusing or deleting them."""
    source, root = tmp_path / "source", tmp_path / "copy"
    emoji.fetch(source)
    shutil.copytree(source / "img", root / "img")
    shutil.rmtree(root / "img" / "twitter" / "64")
    (root / "img" / "twitter" / "64").mkdir()  # empty: nothing to lose, so filled
    inodes = {p: p.stat().st_ino for p in (root / "img").rglob("*.png")}
    capsys.readouterr()
    emoji.fetch(root)
    assert capsys.readouterr().out.count("already holds the glyphs") == 3
    assert set(os.listdir(root)) == fetched(root)
    kept = {p for p in inodes if p.exists() and p.stat().st_ino == inodes[p]}
    assert kept == set(inodes) and len(kept) == 6  # the user's copies themselves, not replacements
    assert sorted(p.name for p in (root / "img" / "twitter" / "64").iterdir()) == GLYPHS
    assert np.array_equal(emoji.load_emoji(root).images, emoji.load_emoji(source).images)


def test_a_killed_fetch_leaves_nothing_outside_root_and_the_rerun_clears_it(npm, tmp_path):
    """SIGKILL right after the second vendor's download: /tmp stays clean, the root holds a hidden staging
    folder and a finished first vendor, which the reader refuses as a fetch stopped part-way; the rerun
    removes the staging folder and finishes."""
    root, tmpdir = tmp_path / "emoji", tmp_path / "tmpdir"
    tmpdir.mkdir()
    (tmp_path / "npm_store" / "kill-after-emoji-datasource-google").touch()
    env = {**os.environ, "TMPDIR": str(tmpdir), "PYTHONPATH": str(REPO)}
    hashes = ", ".join(f"{v!r}: {emoji.TARBALL_SHA256[v]!r}" for v in emoji.VENDORS)  # the fakes' hashes
    code = f"from common import emoji; emoji.TARBALL_SHA256.update({{{hashes}}}); emoji.fetch({str(root)!r})"
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == -9, run.stderr
    assert list(tmpdir.iterdir()) == []
    left = set(os.listdir(root))
    assert left == {"emoji.json", "img", f".apple-{emoji.VERSION}.ok", ".fetch-google.tmp"}, left
    with pytest.raises(DatasetError, match=r"is a fetch stopped part-way \(google, twitter, facebook missing\); "
                                           r"run `make data-emoji`") as info:  # fmt: skip
        emoji.load_emoji(root)
    assert str(root) in str(info.value)
    (tmp_path / "npm_store" / "kill-after-emoji-datasource-google").unlink()
    emoji.fetch(root)
    assert set(os.listdir(root)) == fetched(root)
    assert emoji.load_emoji(root).images.shape == (8, 64, 64, 3)


def test_the_reader_refuses_a_vendor_marked_but_missing_and_reads_a_layout_without_markers(npm, tmp_path):
    root = tmp_path / "emoji"
    emoji.fetch(root, ("google",))
    with pytest.raises(DatasetError, match=r"\(apple, twitter, facebook missing\)"):
        emoji.load_emoji(root)
    emoji.fetch(root)
    shutil.rmtree(root / "img" / "twitter")
    with pytest.raises(DatasetError, match=r"\(twitter missing\)"):
        emoji.load_emoji(root)
    for marker in root.glob(".*.ok"):  # no markers: a layout of the user's (or carry_emoji's), read as it is
        marker.unlink()
    assert sorted(set(emoji.load_emoji(root).vendors)) == ["apple", "facebook", "google"]


def test_help_is_not_taken_for_the_data_folder(tmp_path, monkeypatch, capsys):
    """`python -m common.emoji --help` fetched the four packages into a folder named --help."""
    import common.emoji

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(common.emoji, "fetch", lambda root: pytest.fail(f"fetched into {root}"))
    common.emoji.main(["--help"])
    assert capsys.readouterr().out.startswith("usage: python -m common.emoji [ROOT]")
    with pytest.raises(SystemExit) as info:
        common.emoji.main(["--bogus"])
    assert info.value.code == 2 and list(tmp_path.iterdir()) == []


def test_a_second_fetch_into_the_same_folder_waits_for_the_first(npm, tmp_path):
    """Two `make data-emoji` at once: the second removed the first's staging folder (as a killed run's) and
    downloaded the same packages. It now says it waits, touches nothing until the first is done, then finishes."""
    from common.io import lock_folder

    root = tmp_path / "emoji"
    staging = root / ".fetch-apple.tmp"
    staging.mkdir(parents=True)
    (staging / "emoji-datasource-apple-16.0.0.tgz").write_bytes(b"half downloaded")  # the first fetch's
    first = lock_folder(root)  # held as the first fetch holds it
    hashes = ", ".join(f"{v!r}: {emoji.TARBALL_SHA256[v]!r}" for v in emoji.VENDORS)  # the fakes' hashes
    code = f"from common import emoji; emoji.TARBALL_SHA256.update({{{hashes}}}); emoji.fetch({str(root)!r})"
    second = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)},
                              cwd=tmp_path, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        said = f"emoji: another fetch into {root} is running (`make data-emoji` twice?); waiting for it to end\n"
        assert second.stdout.readline() == said
        assert (staging / "emoji-datasource-apple-16.0.0.tgz").read_bytes() == b"half downloaded"
        assert second.poll() is None
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # the first fetch ends
        os.close(first)
        out, _ = second.communicate(timeout=120)
    assert second.returncode == 0 and set(os.listdir(root)) == fetched(root)
    assert out.splitlines()[-1] == f"emoji: facebook -> {root / 'img' / 'facebook' / '64'}"
