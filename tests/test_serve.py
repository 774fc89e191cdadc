"""The page's server without a browser (starlette's TestClient on tools.webapp over tiny untrained models):
the page's samples, .vqz files and decodings are the commands' own, a repair changes only painted pixels,
every bad input is a 400 (413, 503) with a one-line message and the server goes on, model work is queued."""

from __future__ import annotations

import asyncio
import base64
import io
import re
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import user_error
from fastapi.testclient import TestClient
from PIL import Image
from test_bad_inputs import world  # noqa: F401  (tiny checkpoints of both stages, images, a .vqz)

from common.images import load_image
from stage1_vqvae.model import VQModel
from tools.anomaly_scores import DEFAULT_SCORE
from tools.compress import main_compress, main_decompress
from tools.drawing import keep_from_painted
from tools.load import load_models
from tools.playground import Playground
from tools.sample import main as sample_main
from tools.serve import main as serve
from tools.transform_net import AnomalyNet, TransformNet, reference_features
from tools.uploads import encode_at_most, psnr, read_mask
from tools.webapp import WEB, HttpError, ModelQueue, create_app

LOCAL = "http://127.0.0.1:8000"  # the page as serve prints it: a loopback Host (others are refused)
LIMIT = 300_000  # bytes per request in these tests


def decode(url: str) -> bytes:
    return base64.b64decode(url.split(",", 1)[1])


def pixels(url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(decode(url))))


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def client(world):  # noqa: F811
    play = Playground(load_models(world["prior"], None, "cpu"))
    play.load_test_images()
    with TestClient(create_app(play, max_upload_bytes=LIMIT), base_url=LOCAL) as c:
        yield c


def first_image(world) -> Path:  # noqa: F811
    return sorted(Path(world["images"]).iterdir())[0]


def test_info_and_test_images(client):
    info = client.get("/api/info").json()
    assert info["image_size"] == 16 and info["channels"] == 1 and info["classes"] == ["discs", "squares"]
    assert info["test_images"] > 0, info["test_message"]
    assert info["sample_defaults"] == {"temperature": 1.0, "cfg_scale": 1.0}  # serve --temperature / --cfg_scale
    r = client.get("/api/test_image/0")
    assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (16, 16)


def test_the_pages_test_images_decode_only_what_it_shows(world, monkeypatch):  # noqa: F811
    """The page's test images are the first of stage 1's test split, read with --data.limit: 3 x count files
    of a folder are decoded, not the folder, and no image cache is written."""
    from common import readers
    from common.splits import ImageSplits, data_options
    from stage1_vqvae.model import load_stage1

    decoded = []
    real = readers.read_images
    monkeypatch.setattr(readers, "read_images", lambda files, *a, **k: decoded.extend(files) or real(files, *a, **k))
    play = Playground(load_models(world["prior"], None, "cpu"))
    play.load_test_images(count=2)
    assert len(decoded) == 6 and play.test_message == "2 test images of image_folder"
    _, saved = load_stage1(play.m.vqvae_path)
    full = ImageSplits(**data_options(saved)).split_arrays("test")[0]
    assert len(full) == 8 and torch.equal(play.test_images, full[:2])


def test_the_pages_test_images_are_read_at_stage1s_size(shapes_folder, tmp_path):
    """A real checkpoint's data options do not hold the image size (the model does): a stage 1 trained at 8 px
    on the 16-px shapes folder (as `make demo-emoji` trains emoji, 64 px, at 32) shows its test images at 8 px.
    The page read them at the folder's own size before and showed none."""
    from dataclasses import asdict

    from test_bad_inputs import save_ckpt

    from common.codes import read_meta
    from stage1_vqvae.extract import main as extract_codes
    from stage1_vqvae.vqvae import VQVAE
    from stage2_prior.prior import Prior

    torch.manual_seed(0)
    data = dict(dataset="image_folder", root=str(shapes_folder), val_size=8, test_size=8)  # as Lightning saves it
    stage1 = save_ckpt(VQVAE(1, 8, 16, 1, 8, 4, 8, codebook_size=16).eval(), tmp_path / "stage1.ckpt",
                       datamodule_hyper_parameters=data)  # fmt: skip
    extract_codes(["--ckpt", str(stage1), "--out", str(tmp_path / "codes"), "--accelerator", "cpu"])
    meta = read_meta(tmp_path / "codes")
    prior = save_ckpt(Prior(meta.codebook_size, meta.grid_shape, meta.num_classes, "transformer", "tiny", asdict(meta)),
                      tmp_path / "prior.ckpt")  # fmt: skip
    play = Playground(load_models(prior, None, "cpu"))
    play.load_test_images(count=3)
    assert play.test_message == "3 test images of image_folder", play.test_message
    assert play.test_images.shape == (3, 1, 8, 8)


@pytest.mark.parametrize("label,guidance", [(-1, {}), (1, {}), (1, {"cfg_scale": "2", "cfg_schedule": "constant"}),
                                           (1, {"cfg_scale": "2", "cfg_schedule": "linear"}),
                                           (-1, {"temperature_end": "1.6"})])  # fmt: skip
def test_sample_gives_the_sample_commands_codes(client, world, tmp_path, label, guidance):  # noqa: F811
    form = {"label": label, "n": 6, "seed": 3, "temperature": 0.9, **guidance}
    data = client.post("/api/sample", data=form).json()
    page = np.load(io.BytesIO(decode(data["npz"])))
    classes = [] if label < 0 else ["--classes", str(label)]
    flags = [item for k, v in guidance.items() for item in (f"--{k}", v)]
    sample_main(["--prior", world["prior"], "--n", "6", "--seed", "3", "--temperature", "0.9", *classes, *flags,
                 "--device", "cpu", "--out", str(tmp_path / "s.npz")])  # fmt: skip
    cli = np.load(tmp_path / "s.npz")
    for key in ("codes", "images", "labels"):
        np.testing.assert_array_equal(page[key], cli[key], err_msg=key)
    assert "stage1_ckpt" in cli.files and "stage1_ckpt" not in page.files  # no server path in a download
    assert pixels(data["grid"]).ndim == 2  # greyscale grid


def test_repair_changes_only_painted_pixels(client):
    mask = np.zeros((16, 16, 4), np.uint8)
    mask[2:7, 5:11] = 255  # a 5x6 rectangle: cells (0, 1), (0, 2), (1, 1), (1, 2) of the 4x4 code grid
    data = client.post("/api/repair", data={"test_index": 2, "n": 3, "seed": 1},
                       files={"mask": ("mask.png", png(mask, "RGBA"), "image/png")}).json()  # fmt: skip
    original, painted = pixels(data["original"]), pixels(data["painted"]) > 0
    np.testing.assert_array_equal(painted, mask[..., 3] > 0)
    assert data["codes_redrawn"] == 4 and data["codes"] == 16
    changed = np.zeros_like(painted)
    for url in data["repairs"]:
        repair = pixels(url)
        np.testing.assert_array_equal(repair[~painted], original[~painted])  # kept pixels: exactly the same
        changed |= repair != original
    assert changed.any() and not changed[~painted].any()


@pytest.mark.parametrize("kind", ["prior", "maskgit"])
def test_repair_towards_a_class_gives_the_sample_commands_repairs(world, tmp_path, kind):  # noqa: F811
    """`sample --prime IMAGE --mask M --classes c --cfg_scale 3`'s images, with the same seed, inside the painted
    region (the codes it redraws), the original's pixels outside it; another class, or none, other repairs."""
    image = first_image(world)
    mask = np.zeros((16, 16, 4), np.uint8)
    mask[2:11, 3:12] = 255  # the page's paint: opaque pixels (9 of the 16 codes); the command's hole: black on white
    Image.fromarray(np.where(mask[..., 3] > 0, 0, 255).astype(np.uint8)).save(tmp_path / "hole.png")
    play = Playground(load_models(world[kind], None, "cpu"))
    files = {"image": (image.name, image.read_bytes()), "mask": ("m.png", png(mask, "RGBA"))}
    n = 16  # untrained tiny priors weigh the class little: of 16 repairs some draws differ between classes
    with TestClient(create_app(play, max_upload_bytes=LIMIT), base_url=LOCAL) as c:

        def repair(label: int, cfg_scale: float = 3) -> list[np.ndarray]:
            form = {"label": label, "cfg_scale": cfg_scale, "n": n, "seed": 5, "temperature": 0.9}
            r = c.post("/api/repair", data=form, files=files)
            assert r.status_code == 200, r.text
            return [pixels(r.json()["original"])] + [pixels(u) for u in r.json()["repairs"]]

        (original, *repairs), other, unconditional = repair(1), repair(0), repair(-1, 1)
    sample_main(["--prior", world[kind], "--prime", str(image), "--mask", str(tmp_path / "hole.png"), "--n", str(n),
                 "--classes", "1", "--cfg_scale", "3", "--seed", "5", "--temperature", "0.9", "--device", "cpu",
                 "--out", str(tmp_path / "s.npz")])  # fmt: skip
    cli = np.load(tmp_path / "s.npz")
    assert cli["labels"].tolist() == [1] * n and len(repairs) == n
    painted = mask[..., 3] > 0
    for repair_, drawn in zip(repairs, cli["images"][:, 0]):
        np.testing.assert_array_equal(repair_[painted], drawn[painted])  # the command's repair towards class 1
        np.testing.assert_array_equal(repair_[~painted], original[~painted])  # kept pixels: exactly the same
    for others in (other, unconditional):  # same seed, other repairs: the class reached the sampler
        assert np.array_equal(np.stack(others[1:])[:, ~painted], np.stack(repairs)[:, ~painted])
        assert not np.array_equal(np.stack(others[1:]), np.stack(repairs))


def test_repair_guidance_without_a_class_is_refused_for_an_unconditional_prior(world):  # noqa: F811
    play = Playground(load_models(world["uncond"], None, "cpu"))
    play.load_test_images()
    with TestClient(create_app(play, max_upload_bytes=LIMIT), base_url=LOCAL) as c:
        assert c.get("/api/info").json()["classes"] == []
        refused = [({"cfg_scale": 2}, "CFG scale guides the repairs towards a class, and this prior is "
                                      "unconditional: set it to 1"),
                   ({"label": 0}, "this prior is unconditional: it has no classes to choose from")]  # fmt: skip
        for fields, message in refused:
            r = c.post("/api/repair", data={"test_index": 0, **fields}, files={"mask": ("m.png", MASK)})
            assert r.status_code == 400 and r.json()["error"] == message, r.text
        assert c.post("/api/repair", data={"test_index": 0, "label": -1, "cfg_scale": 1},
                      files={"mask": ("m.png", MASK)}).status_code == 200  # fmt: skip


def test_compress_and_decompress_give_the_commands_files(client, world, tmp_path):  # noqa: F811
    image = first_image(world)
    data = client.post("/api/compress", files={"image": (image.name, image.read_bytes(), "image/png")}).json()
    main_compress([str(image), "--prior", world["prior"], "--out", str(tmp_path / "cli.vqz")])
    assert decode(data["vqz"]) == (tmp_path / "cli.vqz").read_bytes()
    assert data["vq"]["bytes"] == len(decode(data["vqz"])) and data["vq"]["payload_bytes"] < data["vq"]["bytes"]
    for fmt in ("jpeg", "webp"):  # at most the .vqz's size, unless even the lowest quality is larger
        assert data[fmt]["fits"] == (data[fmt]["bytes"] <= data["vq"]["bytes"]), data[fmt]
    main_decompress([str(tmp_path / "cli.vqz"), "--prior", world["prior"], "--out", str(tmp_path / "out")])
    page = client.post("/api/decompress", files={"file": ("x.vqz", decode(data["vqz"]))}).json()
    assert page["count"] == 1 and page["names"] == [f"{image.stem}.png"]  # the name `decompress` writes
    cli = np.asarray(Image.open(tmp_path / "out" / f"{image.stem}.png"))
    np.testing.assert_array_equal(pixels(page["images"][0]), cli)
    np.testing.assert_array_equal(pixels(page["images"][0]), pixels(data["vq"]["png"]))


def test_a_vqz_of_more_images_than_the_page_shows_is_refused_before_its_names(client, world, tmp_path):  # noqa: F811
    """A forged image count (CRC fixed) is refused from the header, before the names are inflated."""
    main_compress([str(first_image(world)), "--prior", world["prior"], "--out", str(tmp_path / "one.vqz")])
    body = bytearray((tmp_path / "one.vqz").read_bytes()[:-4])
    body[81:85] = struct.pack("<I", 10**9)  # the header's image count
    forged = bytes(body) + struct.pack("<I", zlib.crc32(body))
    r = client.post("/api/decompress", files={"file": ("big.vqz", forged)})
    assert r.status_code == 400 and "big.vqz holds 1000000000 images; at most 64 are read here" in r.text, r.text


def test_a_transparent_image_is_read_over_white_as_the_commands_read_it(client, world, tmp_path):  # noqa: F811
    grey = np.asarray(Image.open(first_image(world)).convert("L"))
    rgba = np.stack([grey] * 3 + [np.full_like(grey, 255)], -1)
    rgba[: len(grey) // 2] = (250, 10, 10, 0)  # a colour hidden under transparent pixels: white once composited
    (tmp_path / "icon.png").write_bytes(png(rgba, "RGBA"))
    r = client.post("/api/compress", files={"image": ("icon.png", (tmp_path / "icon.png").read_bytes())})
    assert r.status_code == 200, r.text  # not refused as transparent, nor as colour for this greyscale model
    main_compress([str(tmp_path / "icon.png"), "--prior", world["prior"], "--out", str(tmp_path / "cli.vqz")])
    assert decode(r.json()["vqz"]) == (tmp_path / "cli.vqz").read_bytes()


def test_a_flat_image_compresses_and_identical_pixels_are_not_infinite_psnr(client):
    r = client.post("/api/compress", files={"image": ("black.png", png(np.zeros((16, 16), np.uint8)))})
    assert r.status_code == 200, r.text
    assert None in [r.json()[k]["psnr"] for k in ("vq", "jpeg", "webp")]  # some codec gets black exactly right
    assert psnr(torch.zeros(1, 4, 4, dtype=torch.uint8), torch.zeros(1, 4, 4, dtype=torch.uint8)) is None


def test_anomaly_scores_and_heat_maps(client, world):  # noqa: F811
    files = [("images", (p.name, p.read_bytes(), "image/png")) for p in sorted(Path(world["images"]).iterdir())]
    data = client.post("/api/anomaly", files=files).json()
    assert len(data["rows"]) == len(files) and {"combined_score", DEFAULT_SCORE} <= set(data["scores"])
    ranked = [r["scores"][DEFAULT_SCORE] for r in data["rows"]]
    assert ranked == sorted(ranked, reverse=True) and data["ranked_by"] == DEFAULT_SCORE  # most anomalous first
    assert "transform_knn" not in data["scores"]  # no anomaly net given
    assert pixels(data["rows"][0]["heat"]).shape == (36, 70, 3)  # image | heat map, 2x, 2 px padding


def test_anomaly_net_adds_transform_knn_and_ranks_by_it(world, tmp_path):  # noqa: F811
    images = torch.stack([load_image(p, 16, 1)[0] for p in sorted(Path(world["images"]).iterdir())])  # (N, 1, 16, 16)
    net = TransformNet(1, width=4)
    AnomalyNet([net], [reference_features(net, images[:2])], 1, 16).save(tmp_path / "net.pt")
    play = Playground(load_models(world["prior"], None, "cpu"), anomaly_net=AnomalyNet.load(tmp_path / "net.pt"))
    files = [("images", (p.name, p.read_bytes(), "image/png")) for p in sorted(Path(world["images"]).iterdir())]
    with TestClient(create_app(play, max_upload_bytes=LIMIT), base_url=LOCAL) as c:
        data = c.post("/api/anomaly", files=files).json()
    assert data["ranked_by"] == "transform_knn" and data["scores"][-1] == "transform_knn"
    ranked = [r["scores"]["transform_knn"] for r in data["rows"]]
    assert ranked == sorted(ranked, reverse=True) and min(ranked) < 1e-5  # the two reference images score 0


BIG = png(np.zeros((4100, 4100), np.uint8))  # 16.8 M pixels in a few kB
RGB = np.zeros((16, 16, 3), np.uint8)
RGB[..., 0] = 200
MASK = png(np.full((16, 16, 4), 255, np.uint8), "RGBA")
BAD = [  # (endpoint, form fields, files, status, message)
    ("compress", {}, {"image": ("notes.txt", b"not an image at all")}, 400, r"notes.txt: not an image this page can"),
    ("compress", {}, {"image": ("empty.png", b"")}, 400, r"empty.png: the file is empty"),
    ("compress", {}, {"image": ("huge.png", BIG)}, 400, r"huge.png: 4100x4100 pixels is too large; the limit is"),
    ("compress", {}, {"image": ("big.bin", b"0" * (LIMIT + 10))}, 413, r"upload too large .*the limit is 0.3 MB"),
    ("compress", {}, {"image": ("red.png", png(RGB))}, 400, r"red.png is a colour image \(3 channels\), but this "
                                                           r"model reads 1-channel"),  # fmt: skip
    ("compress", {}, {}, 400, r"no file given \(image\)"),
    ("decompress", {}, {"file": ("x.vqz", b"VQZ1\x02\x00" + bytes(200))}, 400, r"x.vqz: file is corrupt or truncated"),
    ("decompress", {}, {"file": ("a.png", png(RGB))}, 400, r"a.png: not a .vqz file"),
    ("repair", {"test_index": 0}, {"mask": ("m.png", png(np.zeros((16, 16, 4), np.uint8), "RGBA"))}, 400,
     r"nothing is painted"),  # fmt: skip
    ("repair", {"test_index": 999}, {"mask": ("m.png", MASK)}, 400, r"test image 999 does not exist"),
    ("repair", {}, {"mask": ("m.png", MASK)}, 400, r"test_index is missing"),
    ("repair", {"test_index": 0}, {"mask": ("m.png", b"garbage")}, 400, r"the mask: not an image"),
    ("repair", {"test_index": 0, "n": 99}, {"mask": ("m.png", MASK)}, 400, r"number of repairs must be in \[1, 16\]"),
    ("repair", {"test_index": 0, "cfg_scale": 3}, {"mask": ("m.png", MASK)}, 400,
     r"^CFG scale guides the repairs towards a class: choose one, or set it to 1$"),  # fmt: skip
    ("repair", {"test_index": 0, "label": 2, "cfg_scale": 3}, {"mask": ("m.png", MASK)}, 400,
     r"unknown class id 2; this prior has 2 classes"),  # fmt: skip
    ("repair", {"test_index": 0, "label": 1, "cfg_scale": 21}, {"mask": ("m.png", MASK)}, 400,
     r"CFG scale must be in \[0, 20\], got 21"),  # fmt: skip
    ("sample", {"n": 0}, {}, 400, r"number of samples must be in \[1, 256\], got 0"),
    ("sample", {"n": "abc"}, {}, 400, r"n must be an integer, got 'abc'"),
    ("sample", {"temperature": "0"}, {}, 400, r"temperature must be in \(0, 10\]"),
    ("sample", {"temperature": "nan"}, {}, 400, r"temperature must be a finite number"),
    ("sample", {"temperature_end": "11"}, {}, 400, r"end temperature must be in \(0, 10\]"),
    ("sample", {"top_p": "1.5"}, {}, 400, r"top-p must be in \(0, 1\]"),
    ("sample", {"label": 5}, {}, 400, r"unknown class id 5; this prior has 2 classes"),
    ("sample", {"label": -2}, {}, 400, r"label must be a class id, or -1 for none, got -2"),  # it was "none"
    ("repair", {"test_index": 0, "label": -3}, {"mask": ("m.png", MASK)}, 400, r"label must be a class id, or -1"),
    ("sample", {"cfg_scale": 2, "cfg_schedule": "cosine"}, {}, 400,
     r"cfg_schedule must be one of \('constant', 'linear'\)"),  # fmt: skip
    ("anomaly", {}, {}, 400, r"no images given"),
    ("sample", {"n": "9" * 400}, {}, 400, r"number of samples must be in \[1, 256\], got 99999999999999999999\.\.\."),
    ("sample", {"seed": "9" * 400}, {}, 400, r"seed"),  # both were a 500 (int too large to convert to float)
    # a PostScript upload: Pillow would run Ghostscript on it where one is installed; only the usual formats open
    ("compress", {}, {"image": ("x.eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n")}, 400,
     r"x.eps: not an image this page can read"),  # fmt: skip
]


@pytest.mark.parametrize("endpoint,fields,files,status,message", BAD, ids=[f"{i:02d}" for i in range(len(BAD))])
def test_bad_input_is_a_one_line_message_and_the_server_goes_on(client, endpoint, fields, files, status, message):
    r = client.post(f"/api/{endpoint}", data=fields, files=files or None)
    error = r.json()["error"]
    assert r.status_code == status and re.search(message, error), (r.status_code, error)
    assert "\n" not in error and "Traceback" not in error
    assert client.post("/api/sample", data={"n": 2}).status_code == 200


def test_another_sites_page_cannot_use_the_server(world):  # noqa: F811
    """A page of another site the user opens must not make the server work (a cross-site POST: its Origin or
    Sec-Fetch-Site says so), nor read its answers through DNS rebinding (a Host that is not a loopback name,
    when serve listens on one). A non-loopback bind takes any Host but still refuses cross-site POSTs."""
    play = Playground(load_models(world["prior"], None, "cpu"))
    with TestClient(create_app(play), base_url=LOCAL) as c:
        assert c.get("/api/info").status_code == 200
        for host in ("localhost:8000", "127.0.0.2:8000", "[::1]:8000", "LOCALHOST:8000"):  # any loopback address
            assert c.get("/api/info", headers={"Host": host}).status_code == 200, host
        r = c.post("/api/sample", data={"n": 1}, headers={"Host": "LOCALHOST:8000", "Origin": "http://localhost:8000"})
        assert r.status_code == 200, r.json()
        r = c.get("/api/info", headers={"Host": "evil.example:8000"})
        assert r.status_code == 403 and "is not this server's address" in r.json()["error"]
        ok = c.post("/api/sample", data={"n": 1}, headers={"Origin": LOCAL})
        assert ok.status_code == 200, ok.json()
        for headers in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
            r = c.post("/api/sample", data={"n": 1}, headers=headers)
            assert r.status_code == 403 and "another site's page" in r.json()["error"], headers
        r = c.get("/api/test_image/abc")  # FastAPI's own 422 list, now the API's one-line shape
        assert r.status_code == 400 and "index" in r.json()["error"], r.json()
    with TestClient(create_app(play, loopback_only=False), base_url="http://mybox:8000") as c:
        assert c.get("/api/info").status_code == 200
        assert c.post("/api/sample", data={"n": 1}, headers={"Origin": "http://evil.example"}).status_code == 403


def test_a_stalled_request_body_is_cut_off(monkeypatch):
    """A client that sends part of its body and then nothing held its connection for good (slowloris); it now
    gets a 408 after webapp.BODY_TIMEOUT."""
    import asyncio

    from tools import webapp

    monkeypatch.setattr(webapp, "BODY_TIMEOUT", 0.05)
    sent = []

    async def app(scope, receive, send):
        try:
            await receive()
        except webapp.HttpError as e:
            sent.append(e.status)

    async def never():
        await asyncio.sleep(10)

    async def send(message):
        pass

    scope = {"type": "http", "method": "POST", "headers": [(b"host", b"127.0.0.1:8000"), (b"content-length", b"9")]}
    asyncio.run(webapp.Guard(app, max_bytes=100)(scope, never, send))
    assert sent == [408]
    monkeypatch.setattr(webapp, "BODY_TIMEOUT", 10.0)  # a byte now and then, but the whole body takes too long
    monkeypatch.setattr(webapp, "BODY_TOTAL", 0.1)

    async def drip():
        await asyncio.sleep(0.03)
        return {"type": "http.request", "body": b"x", "more_body": True}

    async def reads_all(scope, receive, send):
        try:
            while True:
                await receive()
        except webapp.HttpError as e:
            sent.append(e.status)

    asyncio.run(webapp.Guard(reads_all, max_bytes=100)(scope, drip, send))
    assert sent == [408, 408]


def test_an_unexpected_error_is_a_500_with_one_line_and_the_server_goes_on(client, monkeypatch):
    def broken(*args):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(client.app.state.play, "sample", broken)
    r = TestClient(client.app, raise_server_exceptions=False, base_url=LOCAL).post("/api/sample", data={"n": 2})
    assert r.status_code == 500 and r.json()["error"].startswith("internal error (RuntimeError: boom second line)")
    monkeypatch.undo()
    assert client.post("/api/sample", data={"n": 2}).status_code == 200


def test_out_of_memory_is_a_503_that_says_so_and_the_server_goes_on(client, monkeypatch):
    def too_many(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB. GPU 0 has a total capacity "
                                     "of 15.70 GiB of which 1.10 GiB is free. Including non-PyTorch memory, ...")

    monkeypatch.setattr(client.app.state.play, "sample", too_many)
    r = client.post("/api/sample", data={"n": 2})
    assert r.status_code == 503 and r.json()["error"] == (
        "out of memory (CUDA out of memory. Tried to allocate 9.00 GiB. GPU 0 has a total capacity of 15.70 GiB of "
        "which 1.10 GiB is free); ask for fewer images at once")  # fmt: skip
    monkeypatch.undo()
    assert client.post("/api/sample", data={"n": 2}).status_code == 200


def test_a_chunked_upload_is_cut_off_at_the_limit(client):
    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(LIMIT // 10_000 + 2):
            yield b"x" * 10_000

    r = client.post("/api/compress", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413 and "upload too large" in r.json()["error"]
    assert client.get("/api/health").json()["ok"]


def test_page_fetches_nothing_from_elsewhere(client):
    r = client.get("/")
    assert r.status_code == 200 and "default-src 'none'" in r.headers["content-security-policy"]
    for f in WEB.iterdir():
        text = f.read_text()
        assert not re.search(r"(https?:)?//[\w.-]+\.\w+/|@import|url\(", text), f"{f.name} refers to another origin"
    assert client.get("/docs").status_code == 404  # FastAPI's docs pages would load a CDN


def test_model_work_runs_one_at_a_time_and_a_full_queue_says_busy():
    queue, spans = ModelQueue(max_waiting=4), []

    def work(i: int) -> int:
        start = time.perf_counter()
        time.sleep(0.02)
        spans.append((start, time.perf_counter(), threading.current_thread().name))
        return i

    async def main():
        results = await asyncio.gather(*(queue.run(work, i) for i in range(6)), return_exceptions=True)
        return results

    results = asyncio.run(main())
    assert [r[0] for r in results[:4]] == [0, 1, 2, 3]
    assert all(isinstance(r, HttpError) and r.status == 503 and "busy" in str(r) for r in results[4:])
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])) and len({s[2] for s in spans}) == 1


def test_a_request_whose_client_has_gone_is_skipped_at_its_turn():
    queue, ran = ModelQueue(max_waiting=4), []

    class Gone:
        async def is_disconnected(self) -> bool:
            return True

    async def main():
        return await asyncio.gather(queue.run(ran.append, 1), queue.run(ran.append, 2, request=Gone()),
                                    return_exceptions=True)  # fmt: skip

    first, second = asyncio.run(main())
    assert ran == [1] and isinstance(second, HttpError) and "went away" in str(second)


def test_same_size_codecs_and_masks():
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, 32, 32), dtype=np.uint8))
    roomy, tight = encode_at_most(x, "JPEG", 5000), encode_at_most(x, "WEBP", 10)
    assert roomy["fits"] and roomy["bytes"] <= 5000 and roomy["quality"] > 50 and roomy["decoded"].shape == x.shape
    assert not tight["fits"] and tight["quality"] == 1 and tight["bytes"] > 10
    big = np.zeros((64, 64, 4), np.uint8)
    big[0, 0, 3] = 1  # one faint mask pixel over image pixel (0, 0) at 4x
    painted = read_mask(png(big, "RGBA"), 16)
    assert painted[0, 0] and painted.sum() == 1


def test_a_busy_port_is_a_one_line_error(world, capsys):  # noqa: F811
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        err = user_error(serve, ["--prior", world["prior"], "--port", str(port)], capsys)
    assert re.search(rf"cannot listen on --host 127.0.0.1 --port {port}: .*in use; pick another --port", err), err


def test_painted_pixels_map_onto_each_level_of_a_multi_level_stage1():
    vqvae = VQModel(1, 16, width=8, res_blocks=1, res_width=4, code_dim=4, codebook_size=8,
                    levels=[{"downsample": 2}, {"downsample": 4}])  # fmt: skip
    painted = torch.zeros(16, 16, dtype=torch.bool)
    painted[5, 9] = True  # in cell (1, 2) of the 4x4 level and (2, 4) of the 8x8 level
    keep = keep_from_painted(vqvae, painted)
    assert keep.shape == vqvae.grid_shape == (1, 80)
    redrawn = [(~k[0]).nonzero().tolist() for k in vqvae.split_codes(keep[None])]
    assert sorted(redrawn) == sorted([[[1, 2]], [[2, 4]]])


def test_a_masked_prior_samples_and_repairs_and_says_why_it_cannot_compress(world):  # noqa: F811
    play = Playground(load_models(world["maskgit"], None, "cpu"))
    play.load_test_images()
    with TestClient(create_app(play), base_url=LOCAL) as c:
        assert c.get("/api/info").json()["masked"] is True
        assert c.post("/api/sample", data={"n": 3, "steps": 2}).status_code == 200
        mask = np.zeros((16, 16, 4), np.uint8)
        mask[8:, :] = 255
        data = c.post("/api/repair", data={"test_index": 0, "n": 2, "steps": 3},
                      files={"mask": ("m.png", png(mask, "RGBA"))}).json()  # fmt: skip
        original = pixels(data["original"])
        for url in data["repairs"]:
            np.testing.assert_array_equal(pixels(url)[:8], original[:8])
        image = first_image(world)
        r = c.post("/api/compress", files={"image": (image.name, image.read_bytes())})
        assert r.status_code == 400 and re.search(r"is a maskgit prior, which has no exact likelihood; the Compress "
                                                  r"tab takes transformer or pixelcnn priors", r.json()["error"])
