"""What the page (`serve`) does with the trained models, without the web: sample, repair, compress,
decompress and score. Inputs and outputs are plain values (uint8 tensors, bytes, numbers, PNG files);
a problem the user can fix raises a `UserError` or `ValueError` whose one-line message the page shows.

    play = Playground(load_models("prior.ckpt"))
    play.sample(label=None, n=16, temperature=1.0, top_p=1.0, cfg_scale=1.0, seed=0)  # {"grid": PNG, ...}
    play.repair(image, painted, n=4, ..., label=None, cfg_scale=1.0)  # image uint8 (C, S, S), painted bool (S, S)
    play.compress(image); play.decompress(data, "x.vqz"); play.anomaly(images, names)

The methods are not thread-safe (torch's thread count, the generator, the prior's decoding state): the
web layer runs them one at a time. Compression uses fp32 CPU copies of the networks (exact decoding needs
bit-identical probabilities), the models themselves when they are on the CPU.
"""

from __future__ import annotations

import io
import math
import time

import numpy as np
import torch

from common.grids import make_grid
from common.images import from_uint8, to_uint8
from stage2_prior.build import require_likelihood
from stage2_prior.masked_sampling import DEFAULT_STEPS
from stage2_prior.maskgit import MaskedPrior
from tools.anomaly_scores import SCORES, default_score, heat_map_grid, score_images
from tools.container import ContainerError, check_name, unpack
from tools.drawing import class_labels, draw_codes, repair_images, rows_by_label
from tools.load import Models, load_models
from tools.transform_net import AnomalyNet
from tools.uploads import encode_at_most, png_bytes, psnr
from tools.vqz import (
    DEFAULT_BATCH_SIZE,
    as_codec_models,
    compress_codes,
    decode_images,
    decompress_codes,
    encode_images,
    png_names,
)

MAX_SAMPLES = 256  # per request: one batch of the sampler
MAX_REPAIRS = 16
MAX_IMAGES = 64  # images scored, or decompressed and shown, per request
MAX_STEPS = 256  # decoding passes of a masked prior
# the scores that need no other input than the two models
PAGE_SCORES = [s for s in SCORES if s not in ("likelihood_ratio", "typicality", "transform_knn")]


TEMPERATURE = (0.0, 10.0)  # the page's token temperature: in (lo, hi]
CFG_SCALE = (0.0, 20.0)  # the page's guidance scale: in [lo, hi]


def checked(name: str, value: float, lo: float, hi: float, low_open: bool = False) -> float:
    """value, or a ValueError naming the field and the range it must lie in."""
    if isinstance(value, int) or not math.isnan(value):  # an int of 400 digits: no float, no NaN to test
        if (lo < value if low_open else lo <= value) and value <= hi:
            return value
    shown = f"{value:g}" if isinstance(value, float) else str(value)[:20] + ("..." if len(str(value)) > 20 else "")
    raise ValueError(f"{name} must be in {'(' if low_open else '['}{lo:g}, {hi:g}], got {shown}")


class Playground:
    """The trained models and what the page asks of them."""

    def __init__(self, models: Models, codec: Models | None = None, test_images: torch.Tensor | None = None,
                 anomaly_net: AnomalyNet | None = None,
                 sample_defaults: dict[str, float] | None = None) -> None:  # fmt: skip
        self.m = models
        # the Sample form's starting values (serve --temperature / --cfg_scale)
        self.sample_defaults = {"temperature": 1.0, "cfg_scale": 1.0, **(sample_defaults or {})}
        self.anomaly_net = anomaly_net  # adds transform_knn to the Anomaly tab and ranks by it
        self.codec = codec if codec is not None else (as_codec_models(models) if models.device.type == "cpu" else None)
        self.test_images = test_images  # uint8 (N, C, S, S) or None
        self.test_message = "loading test images ..."
        self.scale = max(1, round(256 / models.image_size))  # display size on the page: ~256 px

    # ------------------------------------------------------------------------------------ facts
    def info(self) -> dict:
        prior = self.m.prior
        return {"classes": self.m.class_names, "image_size": self.m.image_size, "channels": self.m.channels,
                "grid_shape": list(prior.grid_shape), "codebook_size": prior.codebook_size, "scale": self.scale,
                "device": str(self.m.device), "prior": self.m.prior_path.name, "stage1": self.m.vqvae_path.name,
                "max_samples": MAX_SAMPLES, "max_repairs": MAX_REPAIRS, "max_images": MAX_IMAGES,
                "test_images": 0 if self.test_images is None else len(self.test_images),
                "test_message": self.test_message, "masked": self.masked, "default_steps": DEFAULT_STEPS,
                "sample_defaults": self.sample_defaults}  # fmt: skip

    @property
    def masked(self) -> bool:
        """A masked-token prior: parallel decoding in `steps` passes; no likelihood (no compress, no scores)."""
        return isinstance(self.m.prior, MaskedPrior)

    def _likelihood(self, tab: str) -> None:
        require_likelihood(self.m.prior, self.m.prior_path.name, f"the {tab} tab")

    def load_test_images(self, count: int = 24) -> None:
        """The first `count` test images of the data stage 1 was trained on, if that data is on this machine
        (never downloaded); otherwise none, and a message saying so. `--data.limit count` gives the same first
        images and decodes 3 x count files of an image folder, not the folder (minutes for CelebA); nor is an
        image cache written for them."""
        try:
            splits = self.m.stage1_splits(download=False, limit=count, cache_dir=None)
            self.test_images = splits.split_arrays("test")[0][:count].clone()
            self.test_message = f"{len(self.test_images)} test images of {splits.options.dataset}"
        except Exception as e:  # missing data is normal here: the page still takes uploads
            self.test_images = None
            self.test_message = f"no test images: stage 1's data cannot be read here ({str(e).splitlines()[0]})"

    def test_image(self, index: int) -> torch.Tensor:
        n = 0 if self.test_images is None else len(self.test_images)
        if not 0 <= index < n:
            raise ValueError(f"test image {index} does not exist; there are {n}")
        return self.test_images[index]

    # ------------------------------------------------------------------------------------ sample
    def _opts(self, temperature: float, top_p: float, seed: int, cfg_scale: float = 1.0, steps: int = 0,
              cfg_schedule: str = "linear", temperature_end: float | None = None) -> dict:  # fmt: skip
        """The samplers' keywords; steps (0: the default) counts for masked priors only; temperature_end None:
        the constant temperature (as `sample` without --temperature_end)."""
        checked("temperature", temperature, *TEMPERATURE, low_open=True)
        if temperature_end is not None:
            checked("end temperature", temperature_end, *TEMPERATURE, low_open=True)
        checked("top-p", top_p, 0, 1, low_open=True)
        checked("CFG scale", cfg_scale, *CFG_SCALE)
        generator = torch.Generator(device=self.m.device).manual_seed(int(checked("seed", seed, 0, 2**63 - 1)))
        opts = dict(temperature=temperature, top_k=None, top_p=None if top_p >= 1 else top_p, cfg_scale=cfg_scale,
                    cfg_schedule=cfg_schedule, generator=generator,  # the sampler checks the schedule
                    temperature_end=temperature_end)  # fmt: skip
        if self.masked:
            opts["steps"] = int(checked("steps", steps, 0, MAX_STEPS)) or DEFAULT_STEPS
        return opts

    @torch.no_grad()
    def sample(self, label: int | None, n: int, temperature: float, top_p: float, cfg_scale: float, seed: int,
               steps: int = 0, cfg_schedule: str = "linear", temperature_end: float | None = None) -> dict:  # fmt: skip
        """n new images of class `label` (None: all classes, one column each) -> the grid PNG (scaled like
        `sample`'s) and the .npz `sample` writes (codes, images, labels). Same options, seed and device as
        `sample --n n [--classes label] [--steps steps] [--temperature_end E]` give the same codes."""
        checked("number of samples", n, 1, MAX_SAMPLES)
        opts = self._opts(temperature, top_p, seed, cfg_scale, steps, cfg_schedule, temperature_end)
        t0 = time.perf_counter()
        labels, per_row = class_labels(self.m.prior.num_classes, label, n)
        device_labels = None if labels is None else labels.to(self.m.device)
        codes = draw_codes(self.m.prior, n, device_labels, opts)
        images = self.m.vqvae.decode_codes(codes).cpu()
        tiles, nrow = images, per_row
        if label is None and labels is not None:  # one column per class: the classes side by side on a screen
            k = len(labels.unique())
            tiles = rows_by_label(images, labels, per_row).unflatten(0, (k, per_row)).transpose(0, 1).flatten(0, 1)
            nrow = k
        grid = make_grid(tiles, nrow=nrow, scale=2 if self.m.image_size < 64 else 1)
        buf = io.BytesIO()
        np.savez(buf, codes=codes.cpu().numpy().astype(np.uint16), images=to_uint8(images).numpy(),
                 labels=labels.numpy() if labels is not None else np.full(n, -1))  # fmt: skip
        # (no stage1_ckpt, unlike `sample`: the page names files, never their paths on the server)
        return {"grid": png_bytes(torch.from_numpy(grid).permute(2, 0, 1)), "npz": buf.getvalue(),
                "n": n, "seconds": time.perf_counter() - t0}  # fmt: skip

    # ------------------------------------------------------------------------------------ repair
    @torch.no_grad()
    def repair(self, image: torch.Tensor, painted: torch.Tensor, n: int, temperature: float, top_p: float,
               seed: int, steps: int = 0, label: int | None = None, cfg_scale: float = 1.0) -> dict:  # fmt: skip
        """image uint8 (C, S, S) and the painted pixels (S, S) -> n repairs (uint8 PNGs): the codes of every
        cell with a painted pixel re-drawn (towards class `label` with guidance `cfg_scale`; None: unconditional),
        the others kept, decoded, and the original pixels put back outside the painted region, so kept pixels
        stay exactly the same. Same options, seed and device as `sample --prime IMAGE --mask M --n n [--classes
        label --cfg_scale S]` give the same codes, so the same pixels inside the painted region."""
        checked("number of repairs", n, 1, MAX_REPAIRS)
        opts = self._opts(temperature, top_p, seed, cfg_scale, steps)
        if cfg_scale != 1 and label is None:  # sample's rule for --prime: guidance needs a class to guide towards
            if self.m.prior.num_classes == 0:
                raise ValueError("CFG scale guides the repairs towards a class, and this prior is unconditional: "
                                 "set it to 1")  # fmt: skip
            raise ValueError("CFG scale guides the repairs towards a class: choose one, or set it to 1")
        labels = None  # unconditional (the null class), as `sample --prime` without --classes
        if label is not None:  # class_labels refuses an unknown class, or any with an unconditional prior
            labels = class_labels(self.m.prior.num_classes, label, n)[0].to(self.m.device)
        t0 = time.perf_counter()
        repairs, keep = repair_images(self.m.vqvae, self.m.prior, image, painted, n, opts, labels)
        return {"original": png_bytes(image), "painted": png_bytes(painted[None].to(torch.uint8) * 255),
                "repairs": [png_bytes(r) for r in repairs], "codes_redrawn": int((~keep).sum()),
                "codes": int(keep.numel()), "seconds": time.perf_counter() - t0}  # fmt: skip

    # ------------------------------------------------------------------------------------ compress
    def _codec(self, tab: str) -> Models:
        self._likelihood(tab)
        if self.codec is None:  # the models are on a GPU: the coder needs fp32 CPU copies, loaded once
            self.codec = as_codec_models(load_models(self.m.prior_path, self.m.vqvae_path, "cpu"))
        return self.codec

    @torch.no_grad()
    def compress(self, image: torch.Tensor, name: str = "image") -> dict:
        """image uint8 (C, S, S) -> its .vqz (the bytes `compress` writes for that image), stage 1's decoding
        of it as `decompress` gives it back, and JPEG and WebP files of at most the same number of bytes."""
        m = self._codec("Compress")
        t0 = time.perf_counter()
        names = None if check_name(name) else [name]  # as `compress` stores it (a name unfit to store: none)
        data, _ = compress_codes(m, encode_images(m.vqvae, from_uint8(image[None])), DEFAULT_BATCH_SIZE, names=names)
        decoded = to_uint8(decode_images(m.vqvae, decompress_codes(m, data, name)))[0]
        seconds = time.perf_counter() - t0
        pixels = image.shape[1] * image.shape[2]
        out = {"original": png_bytes(image), "vqz": data, "seconds": seconds,
               "vq": {"png": png_bytes(decoded), "bytes": len(data), "bpp": 8 * len(data) / pixels,
                      "payload_bytes": sum(map(len, unpack(data).streams)), "psnr": psnr(decoded, image)}}  # fmt: skip
        for fmt in ("JPEG", "WEBP"):
            enc = encode_at_most(image, fmt, len(data))
            out[fmt.lower()] = {"data": enc["data"], "bytes": enc["bytes"], "bpp": 8 * enc["bytes"] / pixels,
                                "quality": enc["quality"], "fits": enc["fits"], "psnr": psnr(enc["decoded"], image)}
        return out

    @torch.no_grad()
    def decompress(self, data: bytes, name: str) -> dict:
        """.vqz bytes -> the images `decompress` writes (uint8 PNGs), at most MAX_IMAGES of them, and their
        file names as `decompress` writes them."""
        c = unpack(data, name, max_count=MAX_IMAGES)  # the file's checks, before any model work
        count = c.count
        names = [f"{i:06d}.png" for i in range(count)]
        if c.names is not None:
            names = png_names(c.names, name, "`compress` never writes such a file", ContainerError)
        m = self._codec("Compress")
        images = to_uint8(decode_images(m.vqvae, decompress_codes(m, data, name)))
        return {"count": count, "images": [png_bytes(x) for x in images], "names": names,
                "bpp": 8 * len(data) / max(1, count * m.image_size**2)}  # fmt: skip

    # ------------------------------------------------------------------------------------ anomaly
    @torch.no_grad()
    def anomaly(self, images: torch.Tensor, names: list[str]) -> dict:
        """uint8 (N, C, S, S) -> per image the scores of `score_anomalies` that need no other input (and
        transform_knn with an anomaly net) and the image beside its per-code surprise heat map (red, scaled to
        the largest surprise among these images), most anomalous (by the default score, as there) first."""
        self._likelihood("Anomaly")
        if not 1 <= len(images) <= MAX_IMAGES:
            raise ValueError(f"score between 1 and {MAX_IMAGES} images at a time, got {len(images)}")
        x = from_uint8(images)
        scores, surprise = score_images(self.m.prior, self.m.vqvae, x, batch_size=MAX_IMAGES,
                                        anomaly_net=self.anomaly_net)  # fmt: skip
        keys = PAGE_SCORES + (["transform_knn"] if self.anomaly_net else [])
        rank = default_score(self.anomaly_net)
        tiles = heat_map_grid(x, surprise, self.m.vqvae.levels)  # (2N, 3, S, S): each image, then its heat map
        scale = 2 if self.m.image_size < 64 else 1
        rows = [{"name": name, "scores": {k: float(scores[k][i]) for k in keys},
                 "heat": png_bytes(torch.from_numpy(make_grid(tiles[2 * i : 2 * i + 2], nrow=2, scale=scale))
                                   .permute(2, 0, 1))}
                for i, name in enumerate(names)]  # fmt: skip
        rows.sort(key=lambda r: -r["scores"][rank])
        return {"rows": rows, "scores": keys, "ranked_by": rank}
