"""Tests for tools/codec.py, tools/container.py and compress.py: exact round trips with both prior kinds, overhead over
the ideal code length, and a container that rejects truncation, bit flips, other versions, other
checkpoints and 1,000+ fuzzed files with a ContainerError in bounded time."""

import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from conftest import user_error
from PIL import Image

from common.codes import sha256_file
from stage1_vqvae.vqvae import VQVAE
from stage2_prior.build import PRIORS
from stage2_prior.decoding import CodePrior
from stage2_prior.pixelcnn import GatedPixelCNN
from stage2_prior.prior import Prior
from tools import drawing
from tools.codec import best_labels, decode_codes, deterministic, encode_codes
from tools.compress import (
    Models,
    compress_codes,
    decode_images,
    decompress_codes,
    main_compress,
    main_decompress,
)
from tools.container import HEADER, STEP, Container, ContainerError, pack, unpack
from tools.vqz import png_names

K, GRID, SIZE = 32, (4, 4), 16


def make_prior(kind: str, seed: int = 0, sharpen: float = 20.0, num_classes: int = 0) -> Prior:
    """A random-init tiny prior whose output layer is scaled up, so its distributions are peaked."""
    torch.manual_seed(seed)
    meta = dict(image_size=SIZE, channels=1)
    prior = Prior(kind=kind, size="tiny", codebook_size=K, grid_shape=GRID, num_classes=num_classes,
                  codes_meta=meta).eval()  # fmt: skip
    head = [m for m in prior.net.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))][-1]  # any kind
    with torch.no_grad():
        head.weight.mul_(sharpen)
    return prior


def make_vqvae(seed: int = 0) -> VQVAE:
    torch.manual_seed(seed)
    return VQVAE(1, SIZE, 16, 1, 8, 4, 8, codebook_size=K).eval()


def some_codes(prior: Prior, n: int, seed: int = 0) -> np.ndarray:
    """Half drawn from the prior itself (cheap to code), half uniform (many improbable codes)."""
    gen = torch.Generator().manual_seed(seed)
    sampled = prior.sample(n - n // 2, generator=gen).numpy()
    uniform = np.random.default_rng(seed).integers(0, K, (n // 2, *GRID))
    return np.concatenate([sampled, uniform])


def models_with(prior: Prior | CodePrior, vqvae: VQVAE, prior_sha256: str, stage1_sha256: str) -> Models:
    """Models as load_models makes them (the plain prior network), with given checkpoint hashes instead of files."""
    net = prior.net if isinstance(prior, Prior) else prior
    models = Models(net, vqvae, Path("prior.ckpt"), Path("stage1.ckpt"), torch.device("cpu"))
    models.prior_sha256, models.stage1_sha256 = prior_sha256, stage1_sha256
    return models


def save_ckpt(model: pl.LightningModule, path: Path) -> Path:
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "pytorch-lightning_version": pl.__version__}, path)  # fmt: skip
    return path


NAMES = ["a.png", "ünïcode 名字.jpg", "x" * 251 + ".png", "odd\udcff.png", "no suffix"]  # 5 fit names


@pytest.fixture(scope="module", params=["without names", "with names"])
def small_file(request) -> tuple[bytes, np.ndarray, Models]:
    """A 5-image .vqz (two batches) made with a transformer prior, with its codes and models: format
    version 3, and version 4 with file names."""
    prior, vqvae = make_prior("transformer"), make_vqvae()
    models = models_with(prior, vqvae, "ab" * 32, "cd" * 32)
    codes = some_codes(prior, 5)
    data, _ = compress_codes(models, codes, batch_size=3, names=NAMES if request.param == "with names" else None)
    return data, codes, models


@pytest.mark.parametrize("kind", list(PRIORS))
def test_round_trip_exact_over_many_images(kind: str) -> None:
    prior = make_prior(kind)
    codes = some_codes(prior, 40)
    streams, crcs, ideal = encode_codes(prior.net, codes, batch_size=16)  # batches 16, 16, 8
    c = Container("00" * 32, "11" * 32, SIZE, 1, GRID, K, len(codes), 16, prior.net.step_version, streams, crcs)
    threads = torch.get_num_threads()
    decoded = decode_codes(prior.net, unpack(pack(c)))
    assert torch.get_num_threads() == threads and not prior.training  # settings restored
    np.testing.assert_array_equal(decoded, codes)
    actual = 8 * sum(map(len, streams))
    # each stream ends with at most ~2 words of range-coder state; the rest tracks the ideal closely
    assert actual <= 1.01 * ideal + 64 * len(streams), (actual, ideal)


@pytest.mark.parametrize("kind", list(PRIORS))
def test_images_round_trip_through_both_stages(kind: str) -> None:
    vqvae = make_vqvae()
    models = models_with(make_prior(kind), vqvae, "ab" * 32, "cd" * 32)
    images = torch.rand(12, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    codes = vqvae.encode_to_codes(images).numpy()
    data, _ = compress_codes(models, codes, batch_size=5)
    decoded = decompress_codes(models, data)
    np.testing.assert_array_equal(decoded, codes)
    assert torch.equal(decode_images(vqvae, decoded), decode_images(vqvae, codes))


def test_a_code_of_probability_zero_still_codes_and_counts_at_the_floor() -> None:
    """A prior so sharp that improbable codes' probabilities underflow to 0: they are coded at the range coder's
    floor (2^-24), exactly, and the ideal length counts them there (it was inf, printed as "(ideal inf)")."""
    prior = make_prior("transformer", sharpen=1e4)
    codes = np.random.default_rng(0).integers(0, K, (6, *GRID))
    streams, crcs, ideal = encode_codes(prior.net, codes, batch_size=6)
    assert np.isfinite(ideal) and ideal <= codes.size * 24 + 1
    c = Container("00" * 32, "11" * 32, SIZE, 1, GRID, K, len(codes), 6, prior.net.step_version, streams, crcs)
    np.testing.assert_array_equal(decode_codes(prior.net, unpack(pack(c))), codes)


def test_overhead_under_one_percent_for_a_large_batch() -> None:
    prior = make_prior("transformer")
    codes = prior.sample(200, generator=torch.Generator().manual_seed(3)).numpy()
    streams, _, ideal = encode_codes(prior.net, codes, batch_size=200)
    assert 8 * len(streams[0]) <= 1.01 * ideal, (8 * len(streams[0]), ideal)
    assert ideal < 0.8 * codes.size * np.log2(K)  # the prior helps: well under log2 K per code


def test_every_truncation_is_rejected(small_file) -> None:
    data = small_file[0]
    for n in range(len(data)):
        with pytest.raises(ContainerError, match="truncated|corrupt"):
            unpack(data[:n], "f.vqz")
    with pytest.raises(ContainerError, match="f.vqz: .*corrupt"):
        unpack(data + b"\0", "f.vqz")


def test_every_single_bit_flip_is_rejected(small_file) -> None:
    data = small_file[0]
    for i in range(len(data) * 8):
        flipped = bytearray(data)
        flipped[i // 8] ^= 1 << (i % 8)
        with pytest.raises(ContainerError, match="f.vqz: "):
            unpack(bytes(flipped), "f.vqz")


def _with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def test_wrong_version_is_rejected(small_file) -> None:
    data = bytearray(small_file[0][:-4])
    data[4:6] = struct.pack("<H", 6)
    with pytest.raises(ContainerError, match="unsupported .vqz format version 6; this code reads versions 1 to 5"):
        unpack(_with_crc(bytes(data)), "f.vqz")


def test_hostile_but_crc_valid_header_is_rejected(small_file) -> None:
    data = bytearray(small_file[0][:-4])
    fields = list(HEADER.unpack_from(data))
    for index, value, match in [(9, 2**32 - 1, "more than the file can hold"), (10, 0, "batch_size=0"),
                                (5, 2, "channels=2"), (8, 0, "codebook_size=0")]:  # fmt: skip
        bad = fields.copy()
        bad[index] = value
        with pytest.raises(ContainerError, match=match):
            unpack(_with_crc(HEADER.pack(*bad) + bytes(data[HEADER.size :])), "f.vqz")


def test_a_file_of_no_images_is_refused_and_never_written(small_file) -> None:
    """A hand-made file whose count is 0 (CRC valid, no batches): `decompress` made an empty --out of it and
    exited 0. Reading refuses it, and `pack` never writes one."""
    data = small_file[0]
    fields = list(HEADER.unpack_from(data))
    fields[1], fields[9] = 3, 0  # version 3 (no names block), image count
    with pytest.raises(ContainerError, match=r"f.vqz holds no images \(its image count is 0\)"):
        unpack(_with_crc(HEADER.pack(*fields) + data[HEADER.size : HEADER.size + STEP.size]), "f.vqz")
    c = unpack(data)
    c.count, c.streams, c.codes_crc, c.names = 0, [], [], None if c.names is None else []
    with pytest.raises(ValueError, match="a .vqz file holds at least one image, got 0"):
        pack(c)


def test_other_checkpoints_are_rejected(small_file) -> None:
    data, _, models = small_file
    other_prior = models_with(models.prior, models.vqvae, "ef" * 32, models.stage1_sha256)
    with pytest.raises(
        ContainerError, match="different prior: checkpoint SHA-256 differs .*; pass the prior it was made with"
    ):
        decompress_codes(other_prior, data, "f.vqz")
    other_stage1 = models_with(models.prior, models.vqvae, models.prior_sha256, "ef" * 32)
    with pytest.raises(ContainerError, match="different stage-1 checkpoint"):
        decompress_codes(other_stage1, data, "f.vqz")


def test_garbage_streams_with_valid_crc_fail_cleanly(small_file) -> None:
    """Past the file CRC (as a forger could), random streams still end in a ContainerError, never a crash."""
    data, codes, models = small_file
    c = unpack(data)
    rng = np.random.default_rng(0)
    for _ in range(20):
        c.streams = [rng.integers(0, 256, 4 * int(rng.integers(0, 8)), dtype=np.uint8).tobytes() for _s in c.streams]
        with pytest.raises(ContainerError, match="f.vqz: batch 0: "):
            decompress_codes(models, pack(c), "f.vqz")


# ------------------------------------------------------------------------------------------ file names
def named_file(names: list[str] | None, labels: str = "best", classes: int = 0) -> tuple[bytes, np.ndarray, Models]:
    prior = make_prior("transformer", num_classes=classes)
    models = models_with(prior, make_vqvae(), "ab" * 32, "cd" * 32)
    codes = class_codes(prior, 5, classes) if classes else some_codes(prior, 5)
    return compress_codes(models, codes, batch_size=3, labels=labels, names=names)[0], codes, models


@pytest.mark.parametrize("labels", ["best", "null"])
def test_file_names_round_trip_beside_either_label_choice(labels: str) -> None:
    """Names make a version-4 file whose flags say whether labels were coded; the codes decode exactly, the
    names come back as given, and a file without names is the version-3/2 file byte for byte plus nothing."""
    data, codes, models = named_file(NAMES, labels, classes=3)
    c = unpack(data)
    assert c.version == 4 and c.names == NAMES and c.labels_coded == (labels == "best")
    np.testing.assert_array_equal(decompress_codes(models, data), codes)
    plain, _, _ = named_file(None, labels, classes=3)
    assert unpack(plain).version == (3 if labels == "best" else 2) and unpack(plain).names is None
    assert unpack(plain).streams == c.streams  # the names change nothing but the header
    assert len(data) - len(plain) < 1 + 4 + sum(len(n.encode("utf-8", "surrogateescape")) for n in NAMES)


UNFIT = [("../up.png", "not a relative path"), ("a/../../b.png", "not a relative path"), ("/abs.png", "not a relative"),
         ("/etc/x.png", "not a relative"), ("a//b.png", "not a relative"), ("a/./b.png", "not a relative"),
         ("a/b.png/", "not a relative"), ("a\\..\\b.png", "not a plain"), ("..\\up.png", "not a plain"),
         ("a/b\\c.png", "not a relative"), ("", "not a plain"), ("..", "not a plain"), ("nul\0.png", "not a plain"),
         ("back\\slash.png", "not a plain"), ("x" * 256, "longer than 255 bytes"),
         ("d/" + "x" * 256, "longer than 255"), ("/".join(["d" * 200] * 6), "longer than 1024 bytes"),
         ("\ud800.png", "not encodable")]  # fmt: skip


def forge_names(data: bytes, names: list[str], version: int | None = None) -> bytes:
    """`data` (a .vqz with names) with its names block replaced by `names` (and its version by `version`), the
    CRC fixed: what a hand-made file can hold."""
    block = zlib.compress(b"\0".join(n.encode("utf-8", "surrogateescape") for n in names), 9)  # as pack does
    start = HEADER.size + 2  # step version, flags
    length = struct.unpack_from("<I", data, start)[0]
    forged = data[:start] + struct.pack("<I", len(block)) + block + data[start + 4 + length : -4]
    if version is not None:
        forged = forged[:4] + struct.pack("<H", version) + forged[6:]
    return _with_crc(forged)


@pytest.mark.parametrize("bad, problem", UNFIT)
def test_unfit_names_are_refused_when_packing_and_when_reading(bad: str, problem: str) -> None:
    """A name that could write outside --out (or nowhere: absolute, "..", an empty part, a backslash) is refused
    by pack, and a file that holds one anyway (made by hand, CRC fixed), of version 4 or 5, is a ContainerError
    naming it, before any model work."""
    with pytest.raises(ValueError, match=problem):
        named_file(["a.png", bad, "c.png", "d.png", "e.png"])
    if problem == "not encodable":
        return  # cannot be written into a file at all
    data, _, _ = named_file(["sub/" + n for n in NAMES])
    assert unpack(data).version == 5
    # a NUL inside a name splits it in two: one name too many
    match = "f.vqz: corrupt file names? .*" + ("6 for 5" if "\0" in bad else problem)
    v4 = "not a plain file name|not one zlib block"  # version 4 takes no "/" at all, nor 1 kB a name
    for version in (4, 5):
        with pytest.raises(ContainerError, match=match if version == 5 or "/" not in bad else v4):
            unpack(forge_names(data, ["a.png", bad, *NAMES[2:]], version), "f.vqz")


def test_names_with_sub_folders_make_version_5_and_plain_ones_version_4() -> None:
    """Names below sub-folders are stored as given (version 5); a version-4 file may hold none (a reader of
    version 4 refuses them), so files with plain names are what they were, byte for byte."""
    nested = ["cats/a.png", "dogs/a.png", "ünï/名字/x.jpg", "d/" + "x" * 251 + ".png", "no suffix"]
    data, codes, models = named_file(nested)
    c = unpack(data)
    assert c.version == 5 and c.names == nested
    np.testing.assert_array_equal(decompress_codes(models, data), codes)
    flat, _, _ = named_file(NAMES)
    assert unpack(flat).version == 4 and forge_names(data, NAMES, 4) == flat  # only the names block differs
    with pytest.raises(ContainerError, match=r"f.vqz: corrupt file name 'cats/a.png' \(not a plain file name\)"):
        unpack(forge_names(data, nested, 4), "f.vqz")


def test_a_names_block_cannot_expand_without_bound() -> None:
    """A zlib bomb (10 MB of zeros in a few KB), too many or too few names: ContainerErrors, quickly."""
    data, _, _ = named_file(NAMES)
    start = HEADER.size + 2
    length = struct.unpack_from("<I", data, start)[0]
    for raw, match in [(bytes(10_000_000), "not one zlib block of at most"), (b"a\0b", "2 for 5 images"),
                       (b"\0".join([b"n"] * 6), "6 for 5 images"), (None, "corrupt file names")]:  # fmt: skip
        block = zlib.compress(raw) if raw is not None else b"not zlib at all"
        forged = data[:start] + struct.pack("<I", len(block)) + block + data[start + 4 + length : -4]
        t0 = time.perf_counter()
        with pytest.raises(ContainerError, match=match):
            unpack(_with_crc(forged), "f.vqz")
        assert time.perf_counter() - t0 < 1


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    b = bytearray(data)
    for _ in range(int(rng.integers(1, 4))):
        op, i = int(rng.integers(0, 5)), int(rng.integers(0, max(len(b), 1)))
        if op == 0 and b:
            b[i] ^= int(rng.integers(1, 256))  # change a byte
        elif op == 1:
            b[i:i] = rng.integers(0, 256, int(rng.integers(1, 9)), dtype=np.uint8).tobytes()  # insert
        elif op == 2:
            del b[i : i + int(rng.integers(1, 9))]  # delete
        elif op == 3:
            del b[i:]  # truncate
        else:
            b[i : i + 4] = struct.pack("<I", int(rng.integers(0, 2**32)))  # overwrite a word (lengths, counts)
    return bytes(b)


def test_fuzz_1200_mutated_files(small_file) -> None:
    data, codes, models = small_file
    rng = np.random.default_rng(1234)
    t0, errors = time.perf_counter(), 0
    for _ in range(1200):
        bad = mutate(data, rng)
        if bad == data:
            continue
        try:
            decoded = decompress_codes(models, bad, "f.vqz")
        except ContainerError:
            errors += 1
        else:  # only possible with a CRC32 collision: then the codes CRC must still hold
            assert decoded.shape[1:] == GRID
    assert errors >= 1190
    assert time.perf_counter() - t0 < 20


# ------------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("ckpts")
    stage1 = save_ckpt(make_vqvae(), tmp / "stage1.ckpt")
    meta = dict(codebook_size=K, grid_shape=list(GRID), num_classes=0, class_names=[], image_size=SIZE,
                channels=1, stage1_ckpt=str(stage1), stage1_sha256=sha256_file(stage1))  # fmt: skip
    paths = {"stage1": stage1}
    for name, seed in [("prior", 0), ("other_prior", 1)]:
        prior = make_prior("pixelcnn", seed=seed)
        prior.hparams.codes_meta = meta
        paths[name] = save_ckpt(prior, tmp / f"{name}.ckpt")
    rng = np.random.default_rng(0)
    (tmp / "images").mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (20, 24), dtype=np.uint8)).save(tmp / "images" / f"{i}.png")
    paths["images"] = tmp / "images"
    return paths


def test_cli_round_trip_and_no_overwrite(ckpts, tmp_path: Path, capsys) -> None:
    vqz, out = tmp_path / "x.vqz", tmp_path / "decoded"
    main_compress([str(ckpts["images"]), "--prior", str(ckpts["prior"]), "--out", str(vqz)])
    assert "3 images" in capsys.readouterr().out and vqz.stat().st_size > HEADER.size
    main_decompress([str(vqz), "--prior", str(ckpts["prior"]), "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["0.png", "1.png", "2.png"]  # the files' own names
    assert np.asarray(Image.open(out / "0.png")).shape == (SIZE, SIZE)
    (out / "1.png").write_bytes(b"keep me")
    for main, args in [(main_decompress, [str(vqz), "--out", str(out)]),
                       (main_compress, [str(ckpts["images"]), "--out", str(vqz)])]:  # fmt: skip
        with pytest.raises(SystemExit) as e:
            main([*args, "--prior", str(ckpts["prior"])])
        assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "1.png").read_bytes() == b"keep me"
    main_decompress([str(vqz), "--prior", str(ckpts["prior"]), "--out", str(out), "--overwrite"])
    assert (out / "1.png").read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in tmp_path.rglob(".*.tmp")]  # no temp files left behind


def test_the_codec_refuses_a_batch_whose_caches_cannot_fit(ckpts, tmp_path: Path, capsys, monkeypatch) -> None:
    """The coder steps through the codes as sampling does, with the same caches and the same check."""
    monkeypatch.setattr(GatedPixelCNN, "state_bytes", lambda self, n: 1000 * n)
    monkeypatch.setattr(drawing, "available_memory", lambda: 2500)
    vqz = tmp_path / "x.vqz"
    err = user_error(main_compress, [str(ckpts["images"]), "--prior", str(ckpts["prior"]), "--out", str(vqz)], capsys)
    assert "3 grids at once need" in err and "--batch_size 2 or less" in err and not vqz.exists()
    main_compress([str(ckpts["images"]), "--prior", str(ckpts["prior"]), "--out", str(vqz), "--batch_size", "2"])
    assert vqz.is_file()
    monkeypatch.setattr(drawing, "available_memory", lambda: 2000)  # a machine with less: the file's batches of 2
    out = tmp_path / "out"  # do not fit, and decompress has no --batch_size: the message says what to do
    err = user_error(main_decompress, [str(vqz), "--prior", str(ckpts["prior"]), "--out", str(out)], capsys)
    assert "was compressed in batches of 2" in err and "compress again with --batch_size 1" in err
    assert not out.exists()


def test_cli_keeps_file_names_unless_told_not_to(ckpts, tmp_path: Path, capsys) -> None:
    """`compress` keeps each file's name (a JPEG comes back as <stem>.png, pixels as without names);
    `--names none` numbers them; two files that would come back as one are refused before any work."""
    images, prior = ckpts["images"], str(ckpts["prior"])
    Image.open(images / "2.png").save(tmp_path / "photo.jpg")
    main_compress([str(images), str(tmp_path / "photo.jpg"), "--prior", prior, "--out", str(tmp_path / "n.vqz")])
    assert "of them file names" in capsys.readouterr().out
    main_compress([str(images), str(tmp_path / "photo.jpg"), "--prior", prior, "--out", str(tmp_path / "p.vqz"),
                   "--names", "none"])  # fmt: skip
    named, plain = (tmp_path / "n.vqz").read_bytes(), (tmp_path / "p.vqz").read_bytes()
    assert unpack(named).names == ["0.png", "1.png", "2.png", "photo.jpg"] and unpack(plain).names is None
    assert len(plain) < len(named) < len(plain) + 40  # a few bytes an image
    for vqz, out in [("n.vqz", "named"), ("p.vqz", "numbered")]:
        main_decompress([str(tmp_path / vqz), "--prior", prior, "--out", str(tmp_path / out)])
    assert sorted(p.name for p in (tmp_path / "named").iterdir()) == ["0.png", "1.png", "2.png", "photo.png"]
    assert sorted(p.name for p in (tmp_path / "numbered").iterdir()) == [f"{i:06d}.png" for i in range(4)]
    for a, b in [("0.png", "000000.png"), ("photo.png", "000003.png")]:
        assert Image.open(tmp_path / "named" / a).tobytes() == Image.open(tmp_path / "numbered" / b).tobytes()
    (tmp_path / "again").mkdir()
    Image.open(images / "0.png").save(tmp_path / "again" / "0.jpg")
    err = user_error(main_compress, [str(images), str(tmp_path / "again"), "--prior", prior, "--out",
                                     str(tmp_path / "c.vqz")], capsys)  # fmt: skip
    assert "--names keep: " in err and "0.png and " in err and "0.jpg would both decompress to 0.png" in err
    assert "--names none" in err and not (tmp_path / "c.vqz").exists()


def nested_folder(images: Path, root: Path) -> Path:
    """photos/{cats/0.png, dogs/0.png, dogs/deep/1.jpg} from `images`, beside hidden files and folders that
    are not images to compress (a notebook's checkpoints, thumbnails)."""
    for rel, src in [("cats/0.png", "0.png"), ("dogs/0.png", "1.png"), ("dogs/deep/1.jpg", "2.png"),
                     (".ipynb_checkpoints/0-checkpoint.png", "0.png"), ("cats/.thumbs/0.png", "1.png"),
                     ("cats/.0.png", "2.png")]:  # fmt: skip
        (root / "photos" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.open(images / src).save(root / "photos" / rel)
    return root / "photos"


def test_cli_round_trip_of_a_folder_of_sub_folders(ckpts, tmp_path: Path, capsys) -> None:
    """A directory's images are found in its sub-folders (hidden ones skipped), stored under their paths below
    it (version 5), and come back in those sub-folders of --out, the same basename in two folders included;
    an --out whose folders exist already gets the images beside what they hold."""
    photos, prior = nested_folder(ckpts["images"], tmp_path), str(ckpts["prior"])
    vqz = tmp_path / "all.vqz"
    main_compress([str(photos), "--prior", prior, "--out", str(vqz)])
    assert "3 images" in capsys.readouterr().out
    c = unpack(vqz.read_bytes())
    assert c.version == 5 and c.names == ["cats/0.png", "dogs/0.png", "dogs/deep/1.jpg"]
    main_compress([str(photos), "--prior", prior, "--out", str(tmp_path / "p.vqz"), "--names", "none"])
    (tmp_path / "out" / "cats").mkdir(parents=True)
    (tmp_path / "out" / "cats" / "keep.txt").write_text("mine")
    for vqz_name, out in [("all.vqz", "out"), ("p.vqz", "numbered")]:
        main_decompress([str(tmp_path / vqz_name), "--prior", prior, "--out", str(tmp_path / out)])
    found = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert found == ["cats/0.png", "cats/keep.txt", "dogs/0.png", "dogs/deep/1.png"]
    for i, name in enumerate(["cats/0.png", "dogs/0.png", "dogs/deep/1.png"]):
        numbered = Image.open(tmp_path / "numbered" / f"{i:06d}.png").tobytes()
        assert Image.open(tmp_path / "out" / name).tobytes() == numbered
    err = user_error(main_decompress, [str(vqz), "--prior", prior, "--out", str(tmp_path / "out")], capsys)
    assert "cats/0.png already exists" in err and "--overwrite" in err
    main_decompress([str(vqz), "--prior", prior, "--out", str(tmp_path / "out"), "--overwrite"])
    assert (tmp_path / "out" / "cats" / "keep.txt").read_text() == "mine"
    assert not list(tmp_path.rglob(".*.tmp"))  # no temp folder left behind
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "cats").symlink_to(tmp_path / "elsewhere")  # would lead the images out of --out
    err = user_error(main_decompress, [str(vqz), "--prior", prior, "--out", str(tmp_path / "linked")], capsys)
    assert "linked/cats is a link" in err and not list((tmp_path / "elsewhere").iterdir())


@pytest.mark.parametrize("bad", ["../x.png", "{tmp}/abs.png", "a/../../x.png", "a\\..\\x.png", "a//x.png"])
def test_decompress_refuses_a_crafted_file_with_a_name_outside_out(ckpts, tmp_path: Path, capsys, bad: str) -> None:
    """A hand-made .vqz whose names would write outside --out (or nowhere) is refused before anything is
    written, whatever its version says."""
    prior, bad = str(ckpts["prior"]), bad.format(tmp=tmp_path)  # an absolute path that the check below sees
    vqz = tmp_path / "x.vqz"
    main_compress([str(nested_folder(ckpts["images"], tmp_path)), "--prior", prior, "--out", str(vqz)])
    for version in (4, 5):
        (tmp_path / "forged.vqz").write_bytes(forge_names(vqz.read_bytes(), ["a.png", bad, "c.png"], version))
        err = user_error(main_decompress, [str(tmp_path / "forged.vqz"), "--prior", prior, "--out",
                                           str(tmp_path / "deep" / "out")], capsys)  # fmt: skip
        assert f"forged.vqz: corrupt file name {bad!r}" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["forged.vqz", "photos", "x.vqz"]  # nothing written


def test_decompressed_names_are_plain_pngs_of_at_most_255_bytes() -> None:
    assert png_names(["a.jpg", "b.tar.png", "no suffix", "x" * 251 + ".png"], "f", "") == [
        "a.png", "b.tar.png", "no suffix.png", "x" * 251 + ".png"]  # fmt: skip
    with pytest.raises(ContainerError, match=r"f.vqz: x+ would decompress to a name longer than 255 bytes; fix it"):
        png_names(["x" * 253], "f.vqz", "fix it", ContainerError)  # a fit name to store, but not with .png
    assert png_names(["cats/a.jpg", "dogs/a.jpg", "a.b/c.tif", "a.jpg"], "f", "") == [
        "cats/a.png", "dogs/a.png", "a.b/c.png", "a.png"]  # fmt: skip
    with pytest.raises(ValueError, match=r"f: d/x+ would decompress to a name longer than 255 bytes"):
        png_names(["d/" + "x" * 253], "f", "")
    for names, clash in [(["c/a.jpg", "c/a.png"], "c/a.jpg and c/a.png would both"),
                         (["x/a.png", "x/a.png/b.png"], "x/a.png would decompress to x/a.png, the folder of x/a")]:
        with pytest.raises(ValueError, match=clash.replace(".", r"\.")):
            png_names(sorted(names), "f", "")


def test_decompress_refuses_a_hand_made_file_whose_names_collide(ckpts, tmp_path: Path, capsys) -> None:
    vqz = tmp_path / "x.vqz"
    main_compress([str(ckpts["images"]), "--prior", str(ckpts["prior"]), "--out", str(vqz)])
    c = unpack(vqz.read_bytes())
    c.names = ["a.png", "b.png", "a.jpg"]
    (tmp_path / "forged.vqz").write_bytes(pack(c))
    err = user_error(main_decompress, [str(tmp_path / "forged.vqz"), "--prior", str(ckpts["prior"]), "--out",
                                       str(tmp_path / "out")], capsys)  # fmt: skip
    assert "forged.vqz: a.png and a.jpg would both decompress to a.png; `compress` never writes" in err
    assert not (tmp_path / "out").exists()


def test_cli_bad_files_give_clear_errors(ckpts, tmp_path: Path, capsys) -> None:
    vqz = tmp_path / "x.vqz"
    main_compress([str(ckpts["images"]), "--prior", str(ckpts["prior"]), "--out", str(vqz)])
    capsys.readouterr()
    (tmp_path / "cut.vqz").write_bytes(vqz.read_bytes()[:-7])
    cases = [("cut.vqz", "prior", "corrupt or truncated"), ("x.vqz", "other_prior", "different prior"),
             ("missing.vqz", "prior", "no such file")]  # fmt: skip
    for name, prior, message in cases:
        with pytest.raises(SystemExit) as e:
            main_decompress([str(tmp_path / name), "--prior", str(ckpts[prior]), "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and name in err and message in err and "Traceback" not in err


def test_decompress_that_fails_midway_leaves_no_partial_folder(ckpts, tmp_path: Path, capsys, monkeypatch) -> None:
    """Images are written into a hidden temporary folder renamed into place at the end, so a run that dies
    after some images leaves no `--out` that looks complete (and nothing of ours behind when it can clean up)."""
    vqz, out = tmp_path / "x.vqz", tmp_path / "decoded"
    main_compress([str(ckpts["images"]), "--prior", str(ckpts["prior"]), "--out", str(vqz)])
    real_save, calls = Image.Image.save, []

    def dies_on_the_third(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", dies_on_the_third)
    err = user_error(main_decompress, [str(vqz), "--prior", str(ckpts["prior"]), "--out", str(out)], capsys)
    assert "No space left on device" in err and len(calls) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.vqz"]  # no decoded/, no hidden temp folder
    monkeypatch.setattr(Image.Image, "save", real_save)
    main_decompress([str(vqz), "--prior", str(ckpts["prior"]), "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["0.png", "1.png", "2.png"]


def as_version_1(data: bytes) -> bytes:
    """A version-2 file rewritten as the version-1 layout (no step-version byte), CRC fixed."""
    body = bytearray(data[: HEADER.size] + data[HEADER.size + 1 : -4])
    body[4:6] = struct.pack("<H", 1)
    return _with_crc(bytes(body))


@pytest.mark.parametrize("kind", list(PRIORS))
def test_version_1_files_decode_where_the_arithmetic_is_unchanged(kind) -> None:
    """.vqz files record the prior's step version: a version-1 file (step version 1 implied) still decodes
    with a Transformer (same arithmetic); with the PixelCNN, whose step path changed, it is a clear error
    instead of a CRC failure blamed on the machine."""
    vqvae = make_vqvae()
    models = models_with(make_prior(kind), vqvae, "ab" * 32, "cd" * 32)
    codes = some_codes(make_prior(kind), 4)
    data, _ = compress_codes(models, codes, batch_size=3)
    assert unpack(data).step_version == models.prior.step_version
    old = as_version_1(data)
    if models.prior.step_version == 1:
        np.testing.assert_array_equal(decompress_codes(models, old, "old.vqz"), codes)
    else:
        with pytest.raises(ContainerError, match="old.vqz: made with step arithmetic version 1 .* computes version 2"):
            decompress_codes(models, old, "old.vqz")


# ------------------------------------------------------------------------------------------ labels
def class_codes(prior: Prior, n: int, classes: int) -> np.ndarray:
    """Codes drawn from the prior, each image under its own class (so a class fits each one best)."""
    labels = torch.arange(n) % classes
    return prior.sample(n, labels, generator=torch.Generator().manual_seed(5)).numpy()


@pytest.mark.parametrize("kind", list(PRIORS))
def test_class_conditional_prior_codes_the_best_label_first(kind: str) -> None:
    """With a class-conditional prior each stream begins with every image's best label (uniformly coded);
    the round trip stays exact, each label is the argmin of the forward NLL, the ideal counts the labels,
    and it is never worse than the null class alone by more than the labels cost."""
    classes = 3
    prior = make_prior(kind, num_classes=classes)
    codes = np.concatenate([class_codes(prior, 12, classes), some_codes(prior, 6)])
    streams, crcs, ideal = encode_codes(prior.net, codes, batch_size=7)
    c = Container("00" * 32, "11" * 32, SIZE, 1, GRID, K, len(codes), 7, prior.net.step_version, streams, crcs)
    np.testing.assert_array_equal(decode_codes(prior.net, unpack(pack(c))), codes)
    _, _, null_ideal = encode_codes(prior.net, codes, batch_size=7, code_labels=False)
    label_bits = len(codes) * np.log2(classes + 1)
    assert ideal <= null_ideal + label_bits + 1e-6  # never worse than the null class by more than the labels
    with deterministic(prior.net):
        labels = best_labels(prior.net, codes)
        x = torch.from_numpy(codes)
        nll = [F.cross_entropy(prior.net(x, torch.full((len(x),), y)), x, reduction="none").flatten(1).sum(1)
               for y in range(classes + 1)]  # fmt: skip
    nll = torch.stack(nll, 1)
    assert labels.shape == (len(codes),) and 0 <= labels.min() and labels.max() <= classes
    assert torch.equal(nll[torch.arange(len(codes)), torch.from_numpy(labels).long()], nll.min(1).values)
    # the ideal length is the labels plus each image's codes under its best label (forward and step path agree)
    assert ideal == pytest.approx(float(nll.min(1).values.sum()) / np.log(2) + label_bits, rel=1e-4)


def test_labels_pay_when_the_class_matters() -> None:
    """A Transformer whose class embedding dominates: images drawn under a class are coded under it, in
    fewer bits than with the null class, labels included."""
    classes = 3
    prior = make_prior("transformer", num_classes=classes)
    with torch.no_grad():
        prior.net.class_emb.weight.mul_(30)
    codes = class_codes(prior, 12, classes)
    _, _, ideal = encode_codes(prior.net, codes, batch_size=12)
    _, _, null_ideal = encode_codes(prior.net, codes, batch_size=12, code_labels=False)
    assert ideal < null_ideal, (ideal, null_ideal)
    with deterministic(prior.net):
        assert (best_labels(prior.net, codes) == np.arange(12) % classes).mean() >= 0.75


def test_version_2_files_of_a_class_conditional_prior_decode_with_the_null_class() -> None:
    prior = make_prior("transformer", num_classes=3)
    codes = class_codes(prior, 5, 3)
    streams, crcs, _ = encode_codes(prior.net, codes, batch_size=3, code_labels=False)
    old = Container("00" * 32, "11" * 32, SIZE, 1, GRID, K, len(codes), 3, prior.net.step_version, streams, crcs,
                    version=2)  # fmt: skip
    parsed = unpack(pack(old))
    assert parsed.version == 2 and not parsed.labels_coded
    np.testing.assert_array_equal(decode_codes(prior.net, parsed), codes)
    # read as version 3, the same streams do not decode to the same codes (the first symbols become labels)
    parsed.version = 3
    try:
        wrong = decode_codes(prior.net, parsed)
    except ContainerError:
        return
    assert not np.array_equal(wrong, codes)


@pytest.mark.parametrize("labels", ["best", "null"])
def test_compress_codes_round_trips_with_either_label_choice(labels: str) -> None:
    """`compress --labels null` writes what version 2 stored (null class, no labels), so it is version 2."""
    prior = make_prior("transformer", num_classes=3)
    models = models_with(prior, make_vqvae(), "ab" * 32, "cd" * 32)
    codes = class_codes(prior, 7, 3)
    data, _ = compress_codes(models, codes, batch_size=4, labels=labels)
    assert unpack(data).version == (3 if labels == "best" else 2)
    np.testing.assert_array_equal(decompress_codes(models, data), codes)


def test_a_checkpoint_whose_weights_do_not_fit_says_which(tmp_path: Path) -> None:
    """A prior checkpoint whose weights do not fit the network its hyperparameters build (a size table edited
    since, a hand-made file) names the weights and shapes in its one line: only load_state_dict's first line was
    kept ("Error(s) in loading state_dict for Transformer:"), which said nothing of them."""
    from stage2_prior.build import load_prior

    small = Prior(kind="transformer", size="small", codebook_size=K, grid_shape=GRID, num_classes=0,
                  codes_meta=dict(image_size=SIZE, channels=1))  # fmt: skip
    hparams = {**dict(small.hparams), "size": "tiny"}  # the weights of "small" under the name "tiny"
    torch.save({"state_dict": small.state_dict(), "hyper_parameters": hparams}, tmp_path / "p.ckpt")
    with pytest.raises(ValueError) as e:
        load_prior(tmp_path / "p.ckpt")
    message = str(e.value)
    assert "cannot rebuild the prior from it (Error(s) in loading state_dict for Transformer:" in message
    assert "size mismatch for" in message and "\n" not in message and len(message) < 600
