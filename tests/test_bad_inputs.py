"""The table of bad inputs: every row is one command with one mistake a user makes, the message it must print,
and the promise that it is one line on stderr, exit code 2, no traceback, and no file created, changed or
deleted anywhere in the working folder (crafted checkpoints included: a file whose unpickling would create a
marker file must never get that far). Models are tiny and untrained; every row runs in-process."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import struct
import zlib
from dataclasses import asdict
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import user_error

from common.codes import read_meta
from stage1_vqvae.extract import main as extract_codes
from stage1_vqvae.vqvae import VQVAE
from stage2_prior.prior import Prior
from tools.anomaly import main as score_anomalies
from tools.compress import main_compress as compress
from tools.compress import main_decompress as decompress
from tools.evaluate import main as evaluate
from tools.sample import main as sample
from tools.serve import main as serve
from tools.train_anomaly_net import main as train_anomaly_net
from tools.train_feature_net import main as train_feature_net
from tools.transform_net import AnomalyNet, TransformNet

COMMANDS = {"sample": sample, "evaluate": evaluate, "compress": compress, "decompress": decompress,
            "score_anomalies": score_anomalies, "extract_codes": extract_codes,
            "train_feature_net": train_feature_net, "train_anomaly_net": train_anomaly_net, "serve": serve}  # fmt: skip
UNWRITABLE = "/proc/vqgen-cannot-write-here"  # no file can be created under /proc, not even by root


class Marker:
    """Unpickling this object creates a file: proof that code ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def save_ckpt(model: pl.LightningModule, path: Path, **extra) -> Path:
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "pytorch-lightning_version": pl.__version__, **extra}, path)  # fmt: skip
    return path


def zero_image_vqz(vqz: bytes) -> bytes:
    """A hand-made .vqz of the same models holding no images (count 0, no batches; a valid CRC), in format
    version 3, which `pack` writes as: header, step version, batch table, streams, CRC32."""
    from tools.container import HEADER, MAGIC, STEP

    fields = list(HEADER.unpack_from(vqz))
    fields[0], fields[1], fields[9] = MAGIC, 3, 0  # magic, version, image count
    body = HEADER.pack(*fields) + vqz[HEADER.size : HEADER.size + STEP.size]
    return body + struct.pack("<I", zlib.crc32(body))


@pytest.fixture(scope="module")
def world(tmp_path_factory, shapes_folder) -> dict[str, str]:
    """Trained-shaped files of both stages and the inputs the rows refer to, in one folder."""
    root = tmp_path_factory.mktemp("bad_inputs")
    torch.manual_seed(0)
    data = dict(dataset="image_folder", root=str(shapes_folder), image_size=16, val_size=8, test_size=8)
    stage1 = save_ckpt(VQVAE(1, 16, 16, 1, 8, 4, 8, codebook_size=16).eval(), root / "stage1.ckpt",
                       datamodule_hyper_parameters=data)  # fmt: skip
    extract_codes(["--ckpt", str(stage1), "--out", str(root / "codes"), "--accelerator", "cpu"])
    meta = read_meta(root / "codes")
    prior = Prior(meta.codebook_size, meta.grid_shape, meta.num_classes, "transformer", "tiny", asdict(meta))
    save_ckpt(prior, root / "prior.ckpt")
    save_ckpt(Prior(meta.codebook_size, meta.grid_shape, meta.num_classes, "maskgit", "tiny", asdict(meta)),
              root / "maskgit.ckpt")  # fmt: skip
    save_ckpt(Prior(meta.codebook_size, meta.grid_shape, 0, "transformer", "tiny", asdict(meta)),
              root / "uncond.ckpt")  # fmt: skip  (an unconditional prior)
    other = (meta.grid_shape[0] + 1, meta.grid_shape[1] + 1)  # a prior of other codes: another grid, a class more
    save_ckpt(Prior(meta.codebook_size, other, meta.num_classes + 1, "transformer", "tiny", asdict(meta)),
              root / "other_grid.ckpt")  # fmt: skip
    images = root / "images"
    images.mkdir()
    for f in sorted((shapes_folder / "discs").iterdir())[:3]:
        shutil.copy(f, images / f.name)
    bad_images = root / "bad_images"
    shutil.copytree(images, bad_images)
    (bad_images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    bad_folder = root / "bad_folder"  # an image_folder dataset with one corrupt file
    shutil.copytree(shapes_folder, bad_folder)
    (bad_folder / "discs" / "zz_broken.png").write_bytes(b"not an image")
    compress([str(images), "--prior", str(root / "prior.ckpt"), "--out", str(root / "images.vqz")])
    decompress([str(root / "images.vqz"), "--prior", str(root / "prior.ckpt"), "--out", str(root / "decoded")])
    vqz = (root / "images.vqz").read_bytes()
    (root / "corrupt.vqz").write_bytes(vqz[:40] + bytes([vqz[40] ^ 1]) + vqz[41:])
    (root / "zero.vqz").write_bytes(zero_image_vqz(vqz))
    data = (root / "prior.ckpt").read_bytes()
    (root / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (root / "text.ckpt").write_text("this is a text file, not a checkpoint\n")
    torch.save({"state_dict": {}, "hyper_parameters": dict(prior.hparams), "x": Marker(root / "PWNED")},
               root / "crafted.ckpt")  # fmt: skip
    AnomalyNet([TransformNet(1, 4)], [torch.zeros(4, 16)], 5, 28).save(root / "anet28.pt")
    (root / "existing.png").write_bytes(b"keep me")
    (root / "existing.csv").write_text("keep me\n")
    (root / "a_file").write_text("a file, not a folder\n")
    shutil.copy(sorted((shapes_folder / "discs").iterdir())[0], root / "prime.png")
    (root / "run").mkdir()  # a run folder with only a last.ckpt: no validation ran
    shutil.copy(root / "prior.ckpt", root / "run" / "last.ckpt")
    (root / "stale_images").mkdir()  # an earlier run's 10 samples
    for i in range(10):
        shutil.copy(root / "prime.png", root / "stale_images" / f"{i:06d}.png")
    paths = {p.name.replace(".", "_"): str(p) for p in root.iterdir()}  # "images.vqz" -> {images_vqz}
    paths.update({p.stem: str(p) for p in root.glob("*.ckpt")})  # "prior.ckpt" -> {prior}
    return {**paths, "root": str(root), "shapes": str(shapes_folder), "missing": str(root / "missing"),
            "missing_png": str(root / "missing.png"), "corrupt_png": str(bad_images / "broken.png"),
            "first_disc": str(sorted((shapes_folder / "discs").iterdir())[0])}  # fmt: skip


P = ["--prior", "{prior}"]
ROWS = [
    # ------------------------------------------------------------------ checkpoints
    ("sample", ["--prior", "{truncated}"], r"--prior \S*truncated.ckpt is not a PyTorch checkpoint"),
    ("sample", ["--prior", "{text}"], r"--prior \S*text.ckpt is not a PyTorch checkpoint"),
    ("sample", ["--prior", "{crafted}"], r"holds a Python object \(getattr\) beyond tensors .*it is not loaded"),
    ("sample", ["--prior", "{missing}"], r"--prior \S*missing: no such file"),
    ("sample", ["--prior", "{root}/run/best.ckpt"],
     r"best.ckpt: no such file: that run wrote no best.ckpt \(no validation ran, e.g. it ended first\); pass "
     r"\S*run/last.ckpt"),  # fmt: skip
    ("sample", ["--prior", "{root}"], r"--prior \S* is a directory"),
    ("sample", ["--prior", "{stage1}"], r"is not a stage-2 prior checkpoint \(it is a stage-1 VQ-VAE checkpoint"),
    ("sample", [*P, "--vqvae", "{prior}"], r"--vqvae \S*prior.ckpt is not a stage-1 .*\(it is a stage-2 prior"),
    ("sample", [*P, "--vqvae", "{crafted}"], r"--vqvae \S*crafted.ckpt holds a Python object"),
    ("evaluate", ["prior", "--ckpt", "{truncated}", "--codes", "{codes}"], r"--ckpt \S*truncated.ckpt is not a PyT"),
    ("evaluate", ["prior", "--ckpt", "{crafted}", "--codes", "{codes}"], r"holds a Python object"),
    ("evaluate", ["stage1", "--ckpt", "{crafted}"], r"holds a Python object"),
    ("evaluate", ["stage1", "--ckpt", "{prior}"], r"--ckpt \S*prior.ckpt is not a stage-1"),
    ("evaluate", ["samples", "--samples", "{images}", "--ckpt", "{text}"], r"--ckpt \S*text.ckpt is not a PyTorch"),
    ("compress", ["{images}", "--prior", "{truncated}", "--out", "new.vqz"], r"is not a PyTorch checkpoint"),
    ("compress", ["{images}", "--prior", "{crafted}", "--out", "new.vqz"], r"holds a Python object"),
    ("compress", ["{images}", *P, "--vqvae", "{prior}", "--out", "new.vqz"], r"--vqvae \S* is not a stage-1"),
    ("decompress", ["{images_vqz}", "--prior", "{crafted}", "--out", "new_dir"], r"holds a Python object"),
    ("score_anomalies", ["{images}", "--prior", "{crafted}", "--out", "s.csv"], r"holds a Python object"),
    ("extract_codes", ["--ckpt", "{crafted}", "--out", "new_codes"], r"holds a Python object"),
    ("extract_codes", ["--ckpt", "{prior}", "--out", "new_codes"], r"is not a stage-1 .*it is a stage-2 prior"),
    ("extract_codes", ["--ckpt", "{truncated}", "--out", "new_codes"], r"is not a PyTorch checkpoint"),
    # ------------------------------------------------------------------ devices and numbers
    ("sample", [*P, "--device", "cuda:7"], r"--device cuda:7: (no CUDA GPU|this machine has \d+ GPU)"),
    ("sample", [*P, "--device", "foo"], r"--device 'foo' is not a device"),
    ("sample", [*P, "--device", "mps"], r"only cpu and cuda devices"),
    ("evaluate", ["prior", "--ckpt", "{prior}", "--codes", "{codes}", "--device", "foo"], r"'foo' is not a device"),
    ("score_anomalies", ["{images}", *P, "--out", "s.csv", "--device", "cuda:7"], r"--device cuda:7"),
    ("sample", [*P, "--batch_size", "0"], r"--batch_size must be >= 1, got 0"),
    ("sample", [*P, "--n", "0"], r"--n must be >= 1, got 0"),
    ("sample", [*P, "--n", "99999999999999999999"],  # np.sqrt raised a TypeError; 10**9 was killed for memory
     r"--n 99999999999999999999: 99,999,999,999,999,999,999 samples of 16x16 px would hold about [\d,.]+ GiB in "
     r"memory, and [\d,.]+ GiB are free; draw fewer"),  # fmt: skip
    ("sample", [*P, "--per_class", "10000000000"],  # checked against --n's 64 only
     r"--per_class 10000000000: 20,000,000,000 samples of 16x16 px would hold about [\d,.]+ GiB"),
    ("sample", [*P, "--scale", "-2"], r"--scale must be >= 1, got -2"),
    ("sample", [*P, "--top_k", "100000"], r"--top_k must be in \[1, 16\] \(the codebook size\), got 100000"),
    ("sample", [*P, "--top_p", "0"], r"--top_p must be in \(0, 1\], got 0"),
    ("sample", [*P, "--temperature", "0"], r"--temperature must be >= 1e-06, got 0.0 \(--top_k 1 draws the most"),
    ("sample", [*P, "--temperature_end", "-1"], r"--temperature_end must be >= 1e-06, got -1"),
    ("sample", [*P, "--temperature", "1e-300"], r"--temperature must be >= 1e-06, got 1e-300"),  # was a NaN trace
    ("sample", [*P, "--cfg_scale", "-5"], r"--cfg_scale must be in \[0, 1000\] \(1 = off\), got -5"),
    ("sample", [*P, "--cfg_scale", "1e308"], r"--cfg_scale must be in \[0, 1000\]"),  # was a NaN traceback
    ("sample", [*P, "--prime", "{stale_images}/000000.png", "--keep_rows", "4", "--n", "10", "--images",
                "{stale_images}", "--overwrite", "--out", "new.png"],
     r"--images \S*000000.png is also --prime: a command never writes over its own input"),  # fmt: skip
    ("sample", [*P, "--n", "2", "--images", "{images}/fresh", "--out", "{images}/fresh/000000.png"],
     r"--out \S*fresh/000000.png is one of the sample files --images \S*fresh gets"),
    ("sample", [*P, "--seed", str(10**23)], r"--seed must be a 64-bit integer"),  # was torch's overflow message
    ("train_feature_net", ["--data.dataset", "image_folder", "--data.root", "{shapes}", "--seed", str(-(2**64)),
                           "--out", "f.pt"], r"--seed must be a 64-bit integer"),  # fmt: skip
    ("sample", ["--prior", "{uncond}", "--cfg_scale", "3"],
     r"--cfg_scale guides towards a class; --prior \S*uncond.ckpt is unconditional: drop it"),  # was ignored
    ("sample", [*P, "--prime", "{prime_png}", "--keep_rows", "4", "--cfg_scale", "3"],
     r"--cfg_scale with --prime guides the completions towards --classes: give --classes \(or --per_class\), or "
     r"drop --cfg_scale for unconditional completions"),  # fmt: skip  (it was silently ignored)
    ("sample", [*P, "--prime", "{prime_png}", "--keep_rows", "4", "--class_mix", "data"],
     r"--class_mix data is for new samples; completions \(--prime\) take --classes/--per_class"),
    ("sample", ["--prior", "{uncond}", "--prime", "{prime_png}", "--keep_rows", "4", "--classes", "1"],
     r"--classes/--per_class/--class_mix data given, but this prior is unconditional"),
    ("sample", [*P, "--choice_temperature", "2"], r"--choice_temperature is for maskgit priors; --prior \S*prior.ckpt "
     r"is autoregressive"),  # fmt: skip
    ("sample", [*P, "--choice_temperature", "-1"], r"--choice_temperature must be a finite number >= 0, got -1"),
    ("sample", [*P, "--n", "2", "--scale", "100000"],
     r"--scale 100000: a grid of 2 tiles of 1600000x1600000 px would take [\d,.]+ GiB; lower --scale"),
    ("sample", [*P, "--classes", "9"], r"--classes: unknown class id 9; there are 2 classes \(0..1\)"),
    ("sample", [*P, "--classes", "nope"], r"--classes: no class named 'nope'; give ids or names, comma-separated"),
    ("sample", [*P, "--per_class", "0"], r"--per_class must be >= 1"),
    ("sample", [*P, "--class_mix", "data"], r"--class_mix data: --prior \S*prior.ckpt does not record its training"),
    ("sample", [*P, "--class_mix", "data", "--per_class", "2"], r"--class_mix data draws .* drop --classes/--per_c"),
    ("sample", [*P, "--class_mix", "most"], r"argument --class_mix: invalid choice: 'most'"),
    ("sample", [*P, "--n", "abc"], r"sample: error: .*n.*abc"),
    ("sample", [*P, "--bogus"], r"unrecognized arguments: --bogus"),
    ("sample", [], r"the following arguments are required: prior"),
    ("evaluate", ["prior", "--ckpt", "{prior}", "--codes", "{codes}", "--batch_size", "0"], r"--batch_size must be"),
    ("evaluate", ["samples", "--samples", "{images}", "--ckpt", "{stage1}", "--kid_subsets", "0"],
     r"--kid_subsets must be in \[1, 1000\], got 0 \(the default, 100, is what torch-fidelity"),  # KID -55 ± 0
    ("evaluate", ["samples", "--samples", "{images}", "--ckpt", "{stage1}", "--kid_subsets", "-1"],
     r"--kid_subsets must be in \[1, 1000\], got -1"),  # fmt: skip
    ("evaluate", ["samples", "--samples", "{images}", "--ckpt", "{stage1}", "--kid_subsets", "1000000000"],
     r"--kid_subsets must be in \[1, 1000\], got 1000000000"),  # fmt: skip  (ran for minutes without a word)
    ("compress", ["{images}", *P, "--out", "new.vqz", "--batch_size", "0"], r"--batch_size must be in \[1, 4096\]"),
    ("compress", ["{images}", *P, "--out", "new.png"],  # a bitstream was written under an image's name
     r"--out new.png: name a .vqz file \(compress writes a bitstream for `decompress`, not an image\)$"),
    ("compress", ["{prime_png}", "{prime_png}", *P, "--out", "new.vqz"],  # "would both decompress to prime.png"
     r"prime.png is given twice \(also as \S*prime.png\); give each image once$"),
    ("compress", ["{images}", *P, "--out", "new.vqz", "--labels", "some"], r"labels.*Literal\['best', 'null'\]"),
    ("score_anomalies", ["{images}", *P, "--out", "s.csv", "--top", "0"], r"--top must be >= 1"),
    ("extract_codes", ["--ckpt", "{stage1}", "--out", "new_codes", "--batch_size", "0"], r"--batch_size must be"),
    ("extract_codes", ["--ckpt", "{stage1}", "--out", "new_codes", "--accelerator", "mps"],
     r"MPSAccelerator. can not run on your system .*\(check --accelerator, --devices and --strategy: this machine"),
    ("extract_codes", ["--ckpt", "{stage1}", "--out", "new_codes", "--splits", "trian"], r"unknown split"),
    ("train_feature_net", ["--data.dataset", "image_folder", "--data.root", "{shapes}", "--steps", "0",
                           "--out", "f.pt"], r"--steps must be >= 1"),  # fmt: skip
    ("serve", [], r"the following arguments are required: prior"),
    ("serve", ["--prior", "{missing}", "--port", "0"], r"--prior \S*missing: no such file"),
    ("serve", ["--prior", "{crafted}", "--port", "0"], r"holds a Python object"),
    ("serve", ["--prior", "{stage1}", "--port", "0"], r"is not a stage-2 prior checkpoint"),
    ("serve", [*P, "--port", "70000"], r"--port must be in \[0, 65535\], got 70000"),
    ("serve", [*P, "--port", "0", "--temperature", "0"], r"--temperature must be in \(0, 10\], got 0$"),
    ("serve", [*P, "--port", "0", "--temperature_end", "20"], r"--temperature_end must be in \(0, 10\], got 20"),
    ("serve", [*P, "--port", "0", "--cfg_scale", "-1"], r"--cfg_scale must be in \[0, 20\], got -1$"),
    ("serve", [*P, "--port", "0", "--anomaly_net", "{anet28_pt}"], r"anet28.pt was trained on 28x28 images"),
    ("serve", [*P, "--port", "0", "--anomaly_net", "{text}"], r"--anomaly_net \S*text.ckpt is not an anomaly-net"),
    ("serve", [*P, "--port", "http"], r"serve: error: .*port.*http"),
    ("serve", [*P, "--port", "0", "--max_upload_mb", "0"], r"--max_upload_mb must be in \(0, 1000\]"),
    ("serve", [*P, "--port", "0", "--host", "203.0.113.7"], r"cannot listen on --host 203.0.113.7 --port 0"),
    ("serve", [*P, "--port", "0", "--device", "cuda:7"], r"--device cuda:7"),
    # ------------------------------------------------------------------ outputs
    ("sample", [*P, "--out", "{existing_png}"], r"--out \S*existing.png already exists; pass --overwrite"),
    ("sample", [*P, "--out", "{root}"], r"--out \S* is a directory"),
    ("sample", [*P, "--out", "{a_file}/x.png"], r"a_file is a file, not a directory"),
    ("sample", [*P, "--out", UNWRITABLE + "/x.png"], r"cannot write into /proc"),
    ("sample", [*P, "--out", "grid.gif"], r"--out grid.gif: use a .png, .jpg, .webp"),
    ("sample", [*P, "--out", "{images_vqz}"], r"--out \S*images.vqz: use a .png"),
    ("sample", [*P, "--prime", "{prime_png}", "--keep_rows", "4", "--out", "{prime_png}", "--overwrite"],
     r"--out \S*prime.png is also --prime: a command never writes over its own input \(not even with --overwrite"),
    ("sample", [*P, "--n", "2", "--images", "{stale_images}", "--overwrite", "--out", "new.png"],
     r"--images \S*stale_images holds 8 sample file\(s\) beyond the 2 this run writes \(000002.png \.\.\.\) that "
     r"--overwrite would leave among them; empty it or choose another --images"),  # fmt: skip
    ("compress", ["{images}", *P, "--out", "{images_vqz}"], r"images.vqz already exists; pass --overwrite"),
    ("compress", ["{images}", *P, "--out", "{a_file}/x.vqz"], r"is a file, not a directory"),
    ("decompress", ["{images_vqz}", *P, "--out", "{decoded}"], r"decoded/\S+\.png already exists .*pass --overwrite"),
    ("compress", ["{images}", "{first_disc}", *P, "--out", "two.vqz"],
     r"--names keep: \S+ and \S+ would both decompress to \S+\.png; rename one.* or pass --names none"),
    ("decompress", ["{images_vqz}", *P, "--out", "{a_file}"], r"--out \S*a_file is a file; give a directory"),
    ("decompress", ["{images_vqz}", *P, "--out", UNWRITABLE],  # it named UNWRITABLE/x, a file nobody typed
     rf"--out {UNWRITABLE}: cannot write into /proc"),
    ("score_anomalies", ["{images}", *P, "--out", "{existing_csv}"], r"existing.csv already exists"),
    ("score_anomalies", ["{images}", *P, "--out", "s.csv", "--grid", "g.csv"], r"--grid g.csv: name an image"),
    ("score_anomalies", ["{images}", *P, "--out", "s.csv", "--grid", "{existing_png}"], r"existing.png already"),
    ("extract_codes", ["--ckpt", "{stage1}", "--out", "{codes}"], r"already holds extracted codes; pass --overwrite"),
    ("extract_codes", ["--ckpt", "{stage1}", "--out", "{a_file}"], r"a_file is a file; give a directory"),
    ("extract_codes", ["--ckpt", "{stage1}", "--out", "new_codes", "--accelerator", "cpu", "--devices", "-1"],
     r"`devices` selected with `CPUAccelerator` should be an int > 0. \(check --accelerator, --devices and"),
    ("extract_codes", ["--ckpt", "{stage1}", "--out", UNWRITABLE], r"cannot write into /proc"),
    # an empty --out is "." once a Path: extract_codes and decompress filled the working folder, the others said
    # "--out . is a directory"; --grid "" and --json "" were ignored
    ("extract_codes", ["--ckpt", "{stage1}", "--out", ""], r"--out '': give a directory$"),
    ("extract_codes", ["--ckpt", "{stage1}", "--out", "  "], r"--out ' ': give a directory$"),
    ("decompress", ["{images_vqz}", *P, "--out", ""], r"--out '': give a directory$"),
    ("compress", ["{images}", *P, "--out", ""], r"--out '': give a file name$"),
    ("score_anomalies", ["{images}", *P, "--out", ""], r"--out '': give a file name$"),
    ("score_anomalies", ["{images}", *P, "--out", "s.csv", "--grid", ""], r"--grid '': give a file name$"),
    ("evaluate", ["prior", "--ckpt", "{prior}", "--codes", "{codes}", "--json", ""], r"--json '': give a file name$"),
    ("sample", [*P, "--out", ""], r"--out '': give a file name$"),  # it said "--out . is a directory"
    ("sample", [*P, "--classes", ""], r"--classes '': no class given; give ids or names"),  # it drew every class
    ("sample", [*P, "--prime", "{prime_png}", "--keep_rows", "16"],  # keeps every row: drew copies and exited 0
     r"--keep_rows must be in \[0, 15\] \(pixel rows of the 16x16 image to keep; the rows below are redrawn\)"),
    ("evaluate", ["prior", "--ckpt", "{prior}", "--codes", "{codes}", "--split", "trian"],
     r"--split must be one of train, val, test, got 'trian'$"),  # fmt: skip
    ("sample", [*P, "--out", "s.png", "--images", ""], r"--images '': give a directory$"),  # it was ignored
    ("train_feature_net", ["--data.dataset", "image_folder", "--data.root", "{shapes}", "--out", ""],
     r"--out '': give a file name$"),  # fmt: skip  (it wrote the default path instead)
    ("evaluate", ["prior", "--ckpt", "{prior}", "--codes", "{codes}", "--json", "{existing_csv}"], r"already exists"),
    ("evaluate", ["prior", "--ckpt", "{prior}", "--codes", "{codes}", "--json", "{prior}", "--overwrite"],
     r"--json \S*prior.ckpt is also --ckpt: a command never writes over its own input"),  # fmt: skip
    # a file inside an input folder: the codes' meta.json and stage-1 copy, a scored image (all were replaced)
    ("evaluate", ["prior", "--ckpt", "{prior}", "--codes", "{codes}", "--json", "{codes}/meta.json", "--overwrite"],
     r"--json \S*codes/meta.json is also a file of --codes \S*codes: a command never writes over its own input"),
    ("score_anomalies", ["{images}", *P, "--codes", "{codes}", "--out", "{codes}/stage1.ckpt", "--overwrite"],
     r"--out \S*codes/stage1.ckpt is also a file of --codes \S*codes: a command never writes over its own input"),
    ("evaluate", ["samples", "--samples", "{stale_images}", "--ckpt", "{stage1}", "--json",
                  "{stale_images}/000000.png", "--overwrite"],
     r"--json \S*stale_images/000000.png is also an image of --samples \S*stale_images: a command never writes"),
    ("train_feature_net", ["--data.dataset", "image_folder", "--data.root", "{shapes}", "--out", "{existing_png}"],
     r"existing.png already exists"),  # fmt: skip
    # ------------------------------------------------------------------ a masked-token prior: no exact likelihood
    ("compress", ["{images}", "--prior", "{maskgit}", "--out", "new.vqz"],
     r"--prior \S*maskgit.ckpt is a maskgit prior, which has no exact likelihood; compress takes transformer or "
     r"pixelcnn priors"),  # fmt: skip
    ("decompress", ["{images_vqz}", "--prior", "{maskgit}", "--out", "new_dir"],
     r"is a maskgit prior, which has no exact likelihood; decompress takes transformer or pixelcnn"),  # fmt: skip
    ("score_anomalies", ["{images}", "--prior", "{maskgit}", "--out", "s.csv"],
     r"is a maskgit prior, which has no exact likelihood; score_anomalies takes transformer or pixelcnn"),  # fmt: skip
    ("score_anomalies", ["{images}", *P, "--background", "{maskgit}", "--out", "s.csv"],
     r"--background \S*maskgit.ckpt is a maskgit prior, which has no exact likelihood"),  # fmt: skip
    ("score_anomalies", ["{images}", *P, "--background", "{other_grid}", "--out", "s.csv"],
     r"--background \S*other_grid.ckpt does not fit the prior: grid_shape \(5, 5\) \(the prior's: \(4, 4\)\); "
     r"num_classes 3 \(the prior's: 2\); train it on the same codes"),  # fmt: skip  (the sides were swapped)
    ("sample", [*P, "--steps", "4"], r"--steps is for maskgit priors; --prior \S*prior.ckpt is autoregressive"),
    ("sample", ["--prior", "{maskgit}", "--steps", "0"], r"--steps must be >= 1, got 0"),
    ("sample", [*P, "--cfg_scale", "3", "--cfg_schedule", "cosine"],
     r"argument --cfg_schedule: invalid choice: 'cosine' \(choose from '?constant'?, '?linear'?\)"),  # fmt: skip
    # ------------------------------------------------------------------ inputs
    ("sample", [*P, "--prime", "{missing_png}", "--keep_rows", "1"], r"missing.png: no such image file"),
    ("sample", [*P, "--prime", "{images}", "--keep_rows", "1"], r"images is a folder; give one image file"),
    ("evaluate", ["prior", "--ckpt", "{prior}", "--codes", "{prior}"],
     r"codes directory \S*prior.ckpt is a file; give the folder extract_codes --out wrote"),  # fmt: skip
    ("sample", [*P, "--prime", "{corrupt_png}", "--keep_rows", "1"], r"broken.png: cannot read image"),
    ("sample", [*P, "--prime", "{corrupt_png}"], r"--prime needs exactly one of --keep_rows R or --mask"),
    ("compress", ["{bad_images}", *P, "--out", "new.vqz"], r"broken.png: cannot read image"),
    ("compress", ["{missing}", *P, "--out", "new.vqz"], r"missing: no such image file or directory"),
    ("decompress", ["{corrupt_vqz}", *P, "--out", "new_dir"], r"corrupt.vqz: file is corrupt or truncated"),
    ("decompress", ["{stage1}", *P, "--out", "new_dir"], r"stage1.ckpt: not a .vqz file"),
    ("decompress", ["{missing}", *P, "--out", "new_dir"], r"missing: no such file"),
    ("decompress", ["{root}", *P, "--out", "new_dir"], r"bad_inputs\d* is a directory; pass a .vqz file"),
    ("decompress", ["{zero_vqz}", *P, "--out", "new_dir"],
     r"zero.vqz holds no images \(its image count is 0\), and `compress` never writes such a file"),  # exit 0
    ("evaluate", ["samples", "--samples", "{images}", "--ckpt", "{stage1}", "--features", "{run}"],
     r"--features \S*run is a directory; pass a feature-net file \(.pt\)"),  # was "does not exist; train one"
    ("evaluate", ["stage1", "--ckpt", "{stage1}", "--features", "{run}"], r"--features \S*run is a directory"),
    ("score_anomalies", ["{images}", *P, "--out", "s.csv", "--anomaly_net", "{run}"],
     r"--anomaly_net \S*run is a directory; pass an anomaly-net file \(.pt\)"),  # fmt: skip
    ("score_anomalies", ["{bad_images}", *P, "--out", "s.csv"], r"broken.png: cannot read image"),
    ("extract_codes", ["--ckpt", "{stage1}", "--out", "new_codes", "--data.root", "{bad_folder}"],
     r"zz_broken.png: cannot read image"),  # fmt: skip
    ("extract_codes", ["--ckpt", "{stage1}", "--out", "new_codes", "--data.root", "{missing}"], r"does not exist"),
    ("extract_codes", ["--ckpt", "{stage1}", "--out", "new_codes", "--data.root", "{prime_png}"],
     r"--data.root \S*prime.png is a file; pass the folder holding the images"),  # fmt: skip
    ("evaluate", ["prior", "--ckpt", "{prior}", "--codes", "{missing}"], r"codes directory \S*missing does not"),
    ("evaluate", ["prior", "--ckpt", "{prior}", "--codes", "{images}"], r"images has no meta.json"),
    ("evaluate", ["samples", "--samples", "{missing}", "--ckpt", "{stage1}"], r"--samples \S*missing: no such file"),
    ("evaluate", ["samples", "--samples", "{text}", "--ckpt", "{stage1}"], r"--samples \S*text.ckpt"),
    ("evaluate", ["samples", "--samples", "{images}"],
     r"--samples \S*images names no stage 1 and so no data set to compare with: pass --data.dataset"),  # fmt: skip
    ("train_feature_net", ["--data.dataset", "image_folder", "--data.root", "{missing}", "--out", "f.pt"],
     r"image folder \S*missing does not exist"),  # fmt: skip
    # ------------------------------------------------------------------ the anomaly net
    ("score_anomalies", ["{images}", *P, "--out", "s.csv", "--anomaly_net", "{missing}"],
     r"--anomaly_net \S*missing does not exist; train one with `train_anomaly_net"),  # fmt: skip
    ("score_anomalies", ["{images}", *P, "--out", "s.csv", "--anomaly_net", "{crafted}"],
     r"--anomaly_net \S*crafted.ckpt is not an anomaly-net file \(UnpicklingError"),  # fmt: skip
    ("score_anomalies", ["{images}", *P, "--out", "s.csv", "--anomaly_net", "{prior}"],
     r"prior.ckpt is not an anomaly-net file written by train_anomaly_net"),  # fmt: skip
    ("score_anomalies", ["{images}", *P, "--out", "s.csv", "--anomaly_net", "{anet28_pt}"],
     r"anet28.pt was trained on 28x28 images with 1 channel\(s\), the models score 16x16"),  # fmt: skip
    ("score_anomalies", ["{images}", *P, "--out", "s.csv", "--method", "mystery"],
     r"--method 'mystery' is not a score; choose one of nll_bits_per_dim, "),  # fmt: skip
    ("compress", ["{prime_png}", *P, "--out", "{prior}", "--overwrite"],
     r"--out \S*prior.ckpt is also --prior: a command never writes over its own input"),  # replaced the prior
    ("compress", ["{prime_png}", *P, "--out", "{prime_png}", "--overwrite"], r"prime.png is also an image to compress"),
    ("score_anomalies", ["{prime_png}", *P, "--out", "{prime_png}", "--overwrite"],
     r"--out \S*prime.png is also an image to score"),  # fmt: skip  (CSV text was written into the PNG)
    ("score_anomalies", ["{images}", *P, "--out", "s.csv", "--grid", "{prior}", "--overwrite"],
     r"--grid \S*prior.ckpt is also --prior|--grid \S*prior.ckpt: name an image"),
    ("score_anomalies", ["{images}", *P, "--out", "s.csv", "--method", "transform_knn"],
     r"--method transform_knn needs --anomaly_net"),  # fmt: skip
    ("train_anomaly_net", ["--data.dataset", "image_folder", "--data.root", "{shapes}", "--data.image_size", "16",
                           "--classes", "7", "--out", "a.pt"], r"--classes: unknown class id 7; there are 2 classes"),
    ("train_anomaly_net", ["--data.dataset", "image_folder", "--data.root", "{shapes}", "--data.image_size", "16",
                           "--classes", "shirt", "--out", "a.pt"],
     r"--classes: no class named 'shirt'; give ids or names, comma-separated \(0 "),  # fmt: skip
    ("train_anomaly_net", ["--data.dataset", "image_folder", "--data.root", "{shapes}", "--data.image_size", "16",
                           "--out", "{existing_png}"], r"existing.png already exists"),
    ("train_anomaly_net", ["--data.dataset", "image_folder", "--data.root", "{shapes}", "--data.image_size", "16",
                           "--members", "0", "--out", "a.pt"], r"--members must be >= 1, got 0"),
    ("train_anomaly_net", ["--data.dataset", "image_folder", "--data.root", "{missing}", "--out", "a.pt"],
     r"image folder \S*missing does not exist"),  # fmt: skip
    ("train_feature_net", ["--data.dataset", "image_folder", "--data.root", "{shapes}", "--data.cache_dir",
                           "{a_file}", "--out", "f.pt"], r"--data.cache_dir \S*a_file is a file; pass a directory"),
    ("train_feature_net", ["--data.dataset", "image_folder", "--data.root", "{shapes}", "--data.cache_dir",
                           UNWRITABLE, "--out", "f.pt"], r"--data.cache_dir /proc/\S*: cannot create it"),
    ("train_feature_net", ["--data.dataset", "fashion_mnist", "--data.cache_dir", "c", "--out", "f.pt"],
     r"--data.cache_dir is for --data.dataset image_folder; fashion_mnist is read whole into memory"),
    *[("train_feature_net", ["--data.dataset", kind, "--data.test_size", "500", "--out", "f.pt"],  # it was ignored
       rf"--data.test_size 500: {kind} has an official test split \(10,000 images\), used whole; drop "
       r"--data.test_size or set it to 0")
      for kind in ("fashion_mnist", "mnist", "cifar10")],
    ("extract_codes", ["--ckpt", "{stage1}", "--out", "new_codes", "--data.cache_dir", "{a_file}"],
     r"--data.cache_dir \S*a_file is a file"),
    ("train_feature_net", ["--data.dataset", "cifar10", "--data.root", "{missing}", "--out", "f.pt"],
     r"CIFAR-10 not found"),  # fmt: skip
    ("train_feature_net", ["--data.dataset", "fashion_mnist", "--data.root", "{missing}", "--data.download", "false",
                           "--out", "f.pt"], r"fashion_mnist train split not found .*looked for \S*missing"),
]


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under root -> a hash of its bytes ("dir" for folders)."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}  # fmt: skip


def test_an_output_may_replace_a_file_of_its_own_in_an_input_folder(world, tmp_path, capsys):
    """Only the files a command or the pipeline reads are protected: an earlier `evaluate --json` kept in the
    codes directory is replaced with --overwrite, as anywhere else."""
    codes = tmp_path / "codes"
    shutil.copytree(world["codes"], codes)
    (codes / "eval.json").write_text("{}\n")
    evaluate(["prior", "--ckpt", world["prior"], "--codes", str(codes), "--json", str(codes / "eval.json"),
              "--overwrite", "--device", "cpu"])  # fmt: skip
    assert "bits_per_code" in (codes / "eval.json").read_text()


@pytest.mark.parametrize("command,args,message", ROWS, ids=[f"{i:02d}-{r[0]}" for i, r in enumerate(ROWS)])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(world, command, args, message, capsys, monkeypatch):
    root = Path(world["root"])
    monkeypatch.chdir(root)  # relative outputs ("new.vqz", "s.csv", the default samples.png) land here
    before = snapshot(root)
    err = user_error(COMMANDS[command], [a.format(**world) for a in args], capsys)
    assert err.startswith(f"{command}: error: "), err
    assert re.search(message, err), f"{message!r} not in {err!r}"
    assert not (root / "PWNED").exists(), "a crafted checkpoint ran code"
    assert snapshot(root) == before


def _raise_keyboard_interrupt() -> None:
    raise KeyboardInterrupt


@pytest.mark.parametrize("stop, code, line", [
    (_raise_keyboard_interrupt, 130, "sample: interrupted (Ctrl-C)"),
    # SIGTERM (kill, timeout, a scheduler): its default action ended the process at once, silently, leaving the
    # hidden temporary files (an --images folder of PNGs) that no rerun removes
    (lambda: os.kill(os.getpid(), signal.SIGTERM), 143, "sample: stopped by SIGTERM"),
], ids=["ctrl-c", "sigterm"])  # fmt: skip
def test_a_stopped_sample_is_one_line_and_leaves_no_partial_file(stop, code, line, world, capsys, monkeypatch):
    """Ctrl-C or SIGTERM while `sample` writes its outputs (the grid written, the .npz half): one line (no
    traceback), exit code 130 or 143 (so `make` stops), and neither output nor a temporary file is left (they
    are written under temporary names and renamed together at the end)."""
    import numpy as np

    def stopped_savez(f, **arrays):
        f.write(b"half an npz")
        stop()

    root = Path(world["root"])
    monkeypatch.chdir(root)
    monkeypatch.setattr(np, "savez", stopped_savez)
    before = snapshot(root)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        sample(["--prior", world["prior"], "--n", "2", "--out", str(root / "grid.png"), "--images", "imgs"])
    err = capsys.readouterr().err.strip()
    assert info.value.code == code and err == line, err
    assert snapshot(root) == before
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the command's handler is gone with it


def test_a_fifo_or_device_as_output_is_never_replaced(world, tmp_path, capsys):
    """`--out /dev/null --overwrite` as root (Docker, CI) renamed a regular file over the system's /dev/null: an
    output that exists and is no regular file is refused, --overwrite or not (a FIFO stands in for the device)."""
    import stat

    pipe = tmp_path / "pipe.png"
    os.mkfifo(pipe)
    err = user_error(sample, ["--prior", world["prior"], "--n", "2", "--out", str(pipe), "--overwrite"], capsys)
    assert err == (f"sample: error: --out {pipe} is not a regular file (a device, FIFO or socket), which a command "
                   "never replaces (not even with --overwrite); give a file name"), err  # fmt: skip
    assert stat.S_ISFIFO(os.stat(pipe).st_mode)


def test_ctrl_c_in_extract_codes_is_our_line_not_lightnings(world, tmp_path, capsys, monkeypatch):
    """Ctrl-C while extract_codes encodes (inside Lightning's predict loop, which handles KeyboardInterrupt
    itself: its own line, exit 1): one line, exit 130, no codes directory."""
    from stage1_vqvae.extract import CodesPredictor

    encode = CodesPredictor._encode

    def pressed(self, x):
        os.kill(os.getpid(), signal.SIGINT)
        return encode(self, x)

    monkeypatch.setattr(CodesPredictor, "_encode", pressed)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        extract_codes(["--ckpt", world["stage1"], "--out", str(tmp_path / "codes"), "--accelerator", "cpu"])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 130 and err.splitlines()[-1] == "extract_codes: interrupted (Ctrl-C)", err
    assert "Traceback" not in err and not (tmp_path / "codes").exists()


def test_an_extraction_stopped_at_its_commit_leaves_no_empty_folders(world, tmp_path, capsys, monkeypatch):
    """Ctrl-C (or a full disk) once the splits were written, while the stage-1 copy is checked: the new --out's
    train/val/test folders stayed, empty, and train_stage2 then asked for an --overwrite nothing needed."""
    import common.codes_writer

    def pressed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(common.codes_writer, "sha256_file", pressed)
    out = tmp_path / "new" / "codes"
    with pytest.raises(SystemExit) as info:
        extract_codes(["--ckpt", world["stage1"], "--out", str(out), "--accelerator", "cpu"])
    assert info.value.code == 130
    assert list(tmp_path.iterdir()) == []  # neither codes/ nor new/, which the command made


# ------------------------------------------------------------------ out of memory
CUDA_OOM = ("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 139.80 GiB of which "
            "3.50 GiB is free. Including non-PyTorch memory, this process has 136.29 GiB memory in use. If reserved "
            "but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid "
            "fragmentation. See documentation for Memory Management (https://pytorch.org/docs/stable/notes/cuda.html)")
CUDA_OOM_SHORT = ("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 139.80 GiB of which "
                  "3.50 GiB is free")  # fmt: skip


def host_out_of_memory() -> RuntimeError:
    """The CPU allocator's own error, for real: a request no host can map (2**62 bytes)."""
    try:
        torch.empty(2**62, dtype=torch.uint8)
    except RuntimeError as e:
        return e
    raise AssertionError("allocated 4 EiB")


def test_out_of_memory_is_one_line_naming_the_batch_size(world, tmp_path, capsys, monkeypatch):
    """A batch the machine cannot hold, on the host or the card: one line with what was asked and the option that
    sets the batch, exit 2, nothing written; any other RuntimeError is a bug and keeps its traceback."""
    import tools.sample
    from stage1_vqvae.extract import CodesPredictor

    root = Path(world["root"])
    monkeypatch.chdir(root)
    before = snapshot(root)

    def host(*args, **kwargs):
        raise host_out_of_memory()

    monkeypatch.setattr(tools.sample, "draw_codes", host)
    err = user_error(sample, ["--prior", world["prior"], "--n", "4", "--out", "grid.png"], capsys)
    assert err == ("sample: error: out of memory (the host could not allocate 4,294,967,296.0 GiB); pass a smaller "
                   "--batch_size"), err  # fmt: skip

    def card(self, x):
        raise torch.OutOfMemoryError(CUDA_OOM)

    monkeypatch.setattr(CodesPredictor, "_encode", card)
    err = user_error(extract_codes, ["--ckpt", world["stage1"], "--out", "new_codes", "--accelerator", "cpu"], capsys)
    assert err == f"extract_codes: error: out of memory ({CUDA_OOM_SHORT}); pass a smaller --batch_size", err
    monkeypatch.setattr(tools.sample, "draw_codes", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        sample(["--prior", world["prior"], "--n", "4", "--out", "grid.png"])
    assert snapshot(root) == before


@pytest.mark.parametrize("at_step", [0, 12])
def test_training_out_of_memory_is_one_line_naming_the_batch_size(at_step, shapes_folder, tmp_path, capsys,
                                                                  monkeypatch):  # fmt: skip
    """Out of memory in a training step: one line naming --data.batch_size and its value, exit 2; once a
    checkpoint was saved (validation at step 10), where it is, to resume from with a smaller batch."""
    from stage1_vqvae.train import main as train_stage1

    step = VQVAE.training_step

    def oom_from(self, batch, batch_idx):
        if self.global_step >= at_step:
            raise torch.OutOfMemoryError(CUDA_OOM)
        return step(self, batch, batch_idx)

    monkeypatch.setattr(VQVAE, "training_step", oom_from)
    config = Path(__file__).resolve().parents[1] / "configs/stage1/tiny.yaml"
    err = user_error(train_stage1, ["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path),
                                    "--data.dataset", "image_folder", "--data.root", str(shapes_folder),
                                    "--data.image_size", "16", "--data.val_size", "8", "--data.test_size", "8",
                                    "--data.batch_size", "16"], capsys)  # fmt: skip
    expected = (f"train_stage1: error: out of memory ({CUDA_OOM_SHORT}); pass a smaller --data.batch_size (now 16) "
                "and, to keep the batch the learning rate was set for, --trainer.accumulate_grad_batches")
    if at_step:
        expected += f"; the checkpoints saved so far are in {tmp_path / 'version_0' / 'checkpoints'}"
        assert (tmp_path / "version_0" / "checkpoints" / "last.ckpt").is_file()
    assert err == expected, err


class _RunsOut(torch.utils.data.Dataset):
    def __init__(self, error) -> None:
        self.error = error

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int):
        if self.error == "host":
            return torch.empty(2**62, dtype=torch.uint8)
        raise torch.OutOfMemoryError(CUDA_OOM)


@pytest.mark.parametrize("error,what", [("host", "out of memory (the host could not allocate 4,294,967,296.0 GiB)"),
                                        ("card", f"out of memory ({CUDA_OOM_SHORT})")])  # fmt: skip
def test_out_of_memory_in_a_data_loader_worker_is_recognised(error, what):
    """A worker's failed allocation reaches the main process re-raised with the worker's traceback in front."""
    from common.cli import out_of_memory

    with pytest.raises(RuntimeError) as info:
        next(iter(torch.utils.data.DataLoader(_RunsOut(error), num_workers=1)))
    assert "worker process" in str(info.value) and out_of_memory(info.value) == what
    assert out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None

