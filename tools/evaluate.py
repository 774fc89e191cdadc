"""`evaluate`: the numbers users ask for, from the files the pipeline writes, as a table (and --json).

    evaluate stage1 --ckpt runs/stage1/latest/checkpoints/last.ckpt            # data options from the ckpt
    evaluate prior --ckpt runs/stage2_transformer/latest/checkpoints/best.ckpt --codes codes/fashion_mnist
    evaluate samples --samples runs/samples.npz --json samples_eval.json    # data options: the samples' stage 1
    evaluate samples --samples other_model_pngs/ --data.dataset fashion_mnist   # any generator's image files

stage1 (test split): MSE in [-1, 1] pixel units, PSNR, SSIM, reconstruction FID (reconstructions vs the
originals), codebook usage, perplexity, dead codes. prior (codes' test split): NLL in bits per code and
bits per image dimension, top-1 accuracy; for a masked-token (maskgit) prior, which has no exact likelihood,
the NLL and accuracy at masked positions under its training mask schedule (seeded masks), labelled as not
a likelihood. samples (a `sample` .npz, or a folder of image files from any generator): FID, KID, k-NN
precision and recall, the classifier score and class agreement against the test split, each beside its
real-data floor: a random train subset of the same size against the test split (FID is biased upwards at
small n, so the floor, not 0, is what a perfect model would score).

FID/KID features (--features): a feature-net file from `train_feature_net`, "inception" (torch-fidelity),
or auto: runs/feature_net/<dataset>.pt (an image folder: image_folder_<folder name>.pt, checked to have been
trained on that very folder), else Inception if installed, else an error saying what to run (`stage1` then
reports everything but the reconstruction FID, and says what to run for it).
Every FID line names its features: "FID (Fashion-MNIST classifier features)" is not Inception FID.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from common.cli import Parser, UserError, add_device, at_least, check_seed, make_parser, resolve_device, run_command
from common.codes import CodesError, CodesMeta, check_matches, codes_files, load_split, read_meta
from common.images import image_files, to_uint8
from common.io import atomic_file, check_output
from common.readers import SPLITS
from common.splits import ImageSplits, data_options
from stage1_vqvae.model import VQModel
from stage2_prior.decoding import CodePrior, pass_slices
from stage2_prior.maskgit import MaskedPrior, random_mask
from tools.features import Features, load_features, missing_features_message
from tools.fid import fid
from tools.load import load_prior, load_stage1, prior_facts
from tools.sample_files import load_samples, sample_labels, stage1_of_samples
from tools.sample_scores import evaluate_samples, samples_rows

CLASS_MIX_NOTE = 0.1  # total variation above which `evaluate samples` says the classes are mixed unlike the data
# Not --data options: size and channels come from the model or the samples, batching from --batch_size.
SKIPPED_DATA_ARGS = ("image_size", "channels", "batch_size", "num_workers")
# --kid_subsets: torch-fidelity and torchmetrics average KID over 100 subsets (our default); 10x that is the most
# we run. A subset of up to 1,000 features costs ~0.06 s (a 128-d feature net) to ~0.35 s (2,048-d Inception) on
# a 2-core CPU, twice (the samples and the floor): 1,000 subsets are ~2 minutes with a feature net, 10**9 ran on
# without a word. More only shave the noise of the mean, which 100 already puts far below the gaps KID compares.
MAX_KID_SUBSETS = 1000


# ------------------------------------------------------------------------------------------ stage 1
@torch.no_grad()
def evaluate_stage1(model: VQModel, dm: ImageSplits, features: Features | None, device: torch.device,
                    split: str = "test", batch_size: int = 500) -> dict[str, Any]:  # fmt: skip
    """Reconstruction figures of `split`; reconstruction FID only with `features` (None in the result without)."""
    from torchmetrics.image import PeakSignalNoiseRatio  # only this mode

    from stage1_vqvae.metrics import SSIM, ImagePSNR
    from stage1_vqvae.vqvae import CodeUsage  # a torchmetrics Metric: imports Lightning

    model.to(device).eval()
    originals = dm.split_arrays(split)[0]
    if features is not None:
        features.check(originals, f"the {split} images")  # fail before the long part
    psnr = PeakSignalNoiseRatio(data_range=2.0).to(device)  # images live in [-1, 1]; of the pooled MSE
    image_psnr, ssim = ImagePSNR(data_range=2.0).to(device), SSIM(data_range=2.0).to(device)
    usages = [CodeUsage(level["codebook_size"]).to(device) for level in model.levels]  # top first
    sq_err, n_values, recons = 0.0, 0, []
    for images, _ in dm.dataloader(split, batch_size=batch_size):
        images = images.to(device)
        codes = model.encode_to_codes(images)  # (B, *grid_shape): every level
        recon = model.decode_codes(codes)  # (B, C, H, W) in [-1, 1]
        # in the model's passes: SSIM's Gaussian windows hold ~40 MB an image at 256 px (a batch of 500: 20 GB)
        per_pass = model.images_per_pass()
        for r, x in zip(recon.split(per_pass), images.split(per_pass)):
            psnr.update(r, x)
            image_psnr.update(r, x)
            ssim.update(r, x)
        for usage, level_codes in zip(usages, model.split_codes(codes)):
            usage.update(level_codes)
        sq_err += float(F.mse_loss(recon, images, reduction="sum"))
        n_values += images.numel()
        recons.append(to_uint8(recon).cpu())
    levels = []
    for level, usage, dead in zip(model.levels, usages, model.dead_codes()):
        stats = usage.compute()
        used = int((stats["counts"] > 0).sum())
        levels.append({"name": level["name"], "grid_shape": list(level["grid_shape"]), "codes_used": used,
                       "codebook_size": level["codebook_size"], "codebook_usage": used / level["codebook_size"],
                       "perplexity": float(stats["perplexity"]), "dead_codes": dead})  # fmt: skip
    fid_recon = None if features is None else fid(features(torch.cat(recons), "the reconstructions"),
                                                  features(originals, f"the {split} images"))  # fmt: skip
    least = min(levels, key=lambda lv: lv["codebook_usage"])  # one level: that level
    return {
        "split": split, "images": len(originals), "mse": sq_err / max(1, n_values),
        "psnr_db": float(psnr.compute()), "psnr_mean_per_image_db": float(image_psnr.compute()),
        "ssim": float(ssim.compute()), "fid_recon": fid_recon,
        **{k: least[k] for k in ("codebook_usage", "codes_used", "codebook_size", "perplexity", "dead_codes")},
        "levels": levels, "features": None if features is None else features.description,
    }  # fmt: skip


def stage1_rows(r: dict[str, Any], label: str) -> list[tuple[str, str]]:
    rows = [("test MSE ([-1, 1] pixels)", f"{r['mse']:.5f}"), ("PSNR (dB, of the pooled MSE)", f"{r['psnr_db']:.2f}"),
            ("PSNR (dB, mean over images)", f"{r['psnr_mean_per_image_db']:.2f}"),
            ("SSIM (valid 11-px windows)", f"{r['ssim']:.4f}")]  # fmt: skip
    if r["fid_recon"] is not None:
        rows.append((f"reconstruction FID ({label})", f"{r['fid_recon']:.3f}"))
    for lv in r["levels"]:
        name = "" if len(r["levels"]) == 1 else f" ({lv['name']} {lv['grid_shape'][0]}x{lv['grid_shape'][1]})"
        used = f"{lv['codebook_usage']:.3f} ({lv['codes_used']}/{lv['codebook_size']} codes)"
        rows += [(f"codebook usage{name}", used), (f"perplexity{name}", f"{lv['perplexity']:.1f}")]
        if lv["dead_codes"] is not None:  # None: FSQ, which has no restarts
            # Not "unused here": codes the training restarts would re-seed (EMA usage under the threshold),
            # which restarts keep near 0 even for a collapsed level; usage above says what is used.
            rows.append((f"codes awaiting restart{name}", str(lv["dead_codes"])))
    return rows


# ------------------------------------------------------------------------------------------ prior
def check_prior_codes(prior: CodePrior, codes_meta: dict, meta: CodesMeta, codes_dir: str, ckpt: str) -> None:
    """CodesError unless the prior was trained on codes like these (same stage 1, codebook, grid, classes)."""
    check_matches(prior_facts(prior, codes_meta), asdict(meta), f"the codes in {codes_dir}",
                  f"pass the codes directory prior {ckpt} was trained on; its NLL on other codes means nothing")


@torch.no_grad()
def evaluate_prior(prior: CodePrior | MaskedPrior, codes_dir: str, device: torch.device, split: str = "test",
                   batch_size: int = 500) -> dict[str, Any]:  # fmt: skip
    prior.to(device).eval()
    masked_prior, gen = isinstance(prior, MaskedPrior), torch.Generator().manual_seed(0)  # the same masks each run
    meta = read_meta(codes_dir)
    codes_all, labels_all = load_split(codes_dir, split)  # (N, H, W) uint16 memory-mapped, (N,) int64
    if len(codes_all) == 0:
        raise CodesError(f"the {split} split of {codes_dir} is empty")
    nll, correct, n = 0.0, 0, 0
    for start in range(0, len(codes_all), batch_size):
        codes = torch.from_numpy(codes_all[start : start + batch_size].astype("int64")).to(device)  # (B, H, W)
        labels = torch.from_numpy(labels_all[start : start + batch_size]).to(device) if prior.num_classes else None
        # scored: every code (autoregressive), or those masked by the training schedule (maskgit)
        scored = random_mask(codes.shape, gen, device) if masked_prior else torch.ones_like(codes, dtype=torch.bool)
        for rows in pass_slices(len(codes), prior.grid_shape):  # long sequences: a few maps a forward
            c, s, lab = codes[rows], scored[rows], None if labels is None else labels[rows]
            logits = (prior(c, s, lab) if masked_prior else prior(c, lab)).float()  # (b, K, H, W)
            nll += float((F.cross_entropy(logits, c, reduction="none") * s).sum())  # labels -1: null class
            correct += int(((logits.argmax(1) == c) & s).sum())
            n += int(s.sum())
    if masked_prior:
        return {"split": split, "code_maps": len(codes_all), "kind": "maskgit", "masked_codes": n,
                "masked_nll_bits": nll / n / math.log(2), "masked_accuracy": correct / n}  # fmt: skip
    bits_per_code = nll / n / math.log(2)
    h, w = prior.grid_shape
    dims = meta.image_size**2 * meta.channels
    return {"split": split, "code_maps": len(codes_all), "bits_per_code": bits_per_code,
            "bits_per_dim": bits_per_code * h * w / dims, "accuracy": correct / n,
            "given_class": _given(prior.num_classes, labels_all)}  # fmt: skip


def _given(num_classes: int, labels) -> str:
    """Which maps the prior was given a class for: "all", "some" or "none" (labels -1, an unlabelled folder's,
    take the null class: "given the class" read wrong for them)."""
    labelled = int((labels >= 0).sum()) if num_classes else 0  # labels (N,) int64, memory-mapped
    return "all" if labelled == len(labels) else "some" if labelled else "none"


def prior_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    if "masked_nll_bits" in r:
        return [("masked-token NLL (bits per masked code; not a likelihood)", f"{r['masked_nll_bits']:.4f}"),
                ("masked-token top-1 accuracy", f"{r['masked_accuracy']:.4f}")]  # fmt: skip
    # of the codes, not of the pixels (stage 1 is lossy); a conditional prior's given each map's own class, whose
    # own cost (log2 of the classes, once a map) is left out, as the codec's file sizes do not
    given = {"all": ", given the class", "some": ", given the class where labelled"}.get(r.get("given_class"), "")
    return [(f"NLL of the codes (bits per code{given})", f"{r['bits_per_code']:.4f}"),
            (f"NLL of the codes (bits per pixel dim{given})", f"{r['bits_per_dim']:.4f}"),
            ("top-1 accuracy", f"{r['accuracy']:.4f}")]  # fmt: skip


# ------------------------------------------------------------------------------------------ samples
# ------------------------------------------------------------------------------------------ output
def print_table(title: str, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print(title)
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))


def write_json(path: str | Path, result: dict[str, Any]) -> None:
    with atomic_file(path) as f:
        f.write((json.dumps(result, indent=2) + "\n").encode())


# ------------------------------------------------------------------------------------------ CLI
def build_parser(data_defaults: dict[str, Any] | None = None) -> Parser:
    parser = make_parser("evaluate", __doc__)
    subs = parser.add_subcommands(dest="mode")
    helps = {
        "stage1": "test MSE, PSNR, SSIM, reconstruction FID, codebook usage of a stage-1 checkpoint",
        "prior": "test NLL (bits per code, bits per dim) and accuracy of a prior on a codes directory",
        "samples": "FID, KID, precision/recall, classifier score and class agreement of a `sample` .npz (or an "
                   "image folder) against the test split, beside the real-data floor",
    }
    for mode, text in helps.items():
        p = make_parser(f"evaluate {mode}", text)
        if mode == "prior":
            p.add_argument("--ckpt", "--prior", type=str, required=True,  # --prior: what the other commands say
                           help="stage-2 prior checkpoint (.ckpt)")  # fmt: skip
            p.add_argument("--codes", type=str, required=True, help="codes directory (extract_codes --out)")
        else:
            if mode == "samples":
                p.add_argument("--samples", type=str, required=True,
                               help="the .npz `sample` writes, or a folder of image files (any generator's)")
                p.add_argument("--seed", type=int, default=0, help="the floor's train subset and KID's subsets")
                p.add_argument("--kid_subsets", type=int, default=100,
                               help=f"random subsets KID is averaged over (1..{MAX_KID_SUBSETS})")  # fmt: skip
            defaults = "" if mode == "stage1" else (": its data options are the defaults (by default the one "
                                                    "`sample` names in the .npz)")  # fmt: skip
            p.add_argument("--ckpt", type=str, required=mode == "stage1", help=f"stage-1 checkpoint{defaults}")
            p.add_argument("--features", type=str, default="auto", help="feature-net file, inception or auto")
            p.add_class_arguments(ImageSplits, "data", skip=set(SKIPPED_DATA_ARGS))
            p.set_defaults({f"data.{k}": v for k, v in (data_defaults or {}).items() if k not in SKIPPED_DATA_ARGS})
        if mode != "samples":
            p.add_argument("--split", type=str, default="test", help="train, val or test")
        p.add_argument("--batch_size", type=int, default=500)
        add_device(p)
        p.add_argument("--json", type=str, default=None, help="also write the results to this JSON file")
        p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
        subs.add_subcommand(mode, p, help=text)
    return parser


def run(mode: str, cfg, model: VQModel | None) -> dict[str, Any]:
    at_least(1, batch_size=cfg.batch_size)
    if getattr(cfg, "seed", None) is not None:
        check_seed(cfg.seed)
    if getattr(cfg, "split", None) is not None and cfg.split not in SPLITS:  # an error from the data named no flag
        raise UserError(f"--split must be one of {', '.join(SPLITS)}, got {cfg.split!r}")
    if mode == "samples" and not 1 <= cfg.kid_subsets <= MAX_KID_SUBSETS:  # 0 and -1 printed one subset's KID
        raise UserError(f"--kid_subsets must be in [1, {MAX_KID_SUBSETS}], got {cfg.kid_subsets} (the default, "
                        "100, is what torch-fidelity and torchmetrics use)")  # fmt: skip
    if cfg.json is not None:  # --json "" too: check_output refuses it
        inputs = {f"--{k}": getattr(cfg, k, None) for k in ("ckpt", "samples", "features")}
        if getattr(cfg, "codes", None):  # the files of folders: --json codes/meta.json replaced the codes' own
            inputs[f"a file of --codes {cfg.codes}"] = codes_files(cfg.codes)
        if getattr(cfg, "samples", None) and Path(cfg.samples).is_dir():
            inputs[f"an image of --samples {cfg.samples}"] = image_files([cfg.samples])
        check_output(cfg.json, cfg.overwrite, "--json", inputs=inputs)
    device = resolve_device(cfg.device)
    if mode == "prior":
        prior, hparams = load_prior(cfg.ckpt, "--ckpt")
        check_prior_codes(prior, hparams.get("codes_meta") or {}, read_meta(cfg.codes), cfg.codes, cfg.ckpt)
        figures = evaluate_prior(prior, cfg.codes, device, cfg.split, cfg.batch_size)
        result = {"mode": mode, "ckpt": cfg.ckpt, "codes": cfg.codes, **figures}
        print_table(f"prior {cfg.ckpt} on {cfg.codes} ({cfg.split}, {result['code_maps']} code maps)",
                    ("metric", "value"), prior_rows(result))  # fmt: skip
        return result
    data = cfg.data.as_dict()
    samples = None  # the user's file first, then the rest
    if mode == "samples":  # a folder's images are read in the data's colour
        samples = load_samples(cfg.samples, ImageSplits(**data).channels if Path(cfg.samples).is_dir() else None)
    # stage1's PSNR, SSIM and usage need no features: without any (and none asked for), no reconstruction FID
    size = model.image_size if mode == "stage1" else samples.shape[-1]  # a feature net reads one size: its file's
    features = load_features(cfg.features, data["dataset"], device, optional=mode == "stage1", root=data.get("root"),
                             image_size=size)  # fmt: skip
    if mode == "stage1":
        dm = ImageSplits(**data, image_size=model.image_size, channels=model.in_channels)
        result = {"mode": mode, "ckpt": cfg.ckpt, "dataset": data["dataset"],
                  **evaluate_stage1(model, dm, features, device, cfg.split, cfg.batch_size)}  # fmt: skip
        print_table(f"stage 1 {cfg.ckpt} on {data['dataset']} ({cfg.split}, {result['images']} images)",
                    ("metric", "value"), stage1_rows(result, features.label if features else ""))  # fmt: skip
        if features is None:
            print(f"no reconstruction FID: {missing_features_message(data['dataset'], data.get('root'), size)}")
            return result
    else:
        c, h, _ = samples.shape[1:]
        try:
            dm = ImageSplits(**data, image_size=h, channels=c)
        except ValueError as e:
            raise ValueError(f"--samples {cfg.samples} holds {h}x{h} images with {c} channel(s), which "
                             f"--data.dataset {data['dataset']} cannot provide ({e})") from e  # fmt: skip
        result = {"mode": mode, "samples_file": cfg.samples, "dataset": data["dataset"],
                  **evaluate_samples(samples, dm, features, cfg.seed, cfg.kid_subsets, sample_labels(cfg.samples))}
        print_table(f"{result['samples']} samples {cfg.samples} vs {data['dataset']} test ({result['test_images']} "
                    "images); floor: a train subset of the same size", ("metric", "samples", "real-data floor"),
                    samples_rows(result, features.label))  # fmt: skip
        if (result["class_mix_distance"] or 0) > CLASS_MIX_NOTE:
            print(f"note: the samples' classes are not mixed as the test split's (total variation "
                  f"{result['class_mix_distance']:.2f}) and the FID counts that too; for a like-for-like score draw "
                  "them in the data's proportions: `sample --n N --class_mix data`")  # fmt: skip
    print(f"features: {features.description}")
    return result


def _run(args: list[str] | None) -> str | None:
    args = sys.argv[1:] if args is None else list(args)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("mode", nargs="?")
    pre.add_argument("--ckpt")
    pre.add_argument("--samples")
    known = pre.parse_known_args(args)[0]
    model, data_defaults = None, {}
    ckpt, what = known.ckpt, "--ckpt"
    if known.mode == "samples" and not ckpt:  # the stage 1 that `sample` recorded in the .npz
        ckpt, what = stage1_of_samples(known.samples), f"the stage1_ckpt of --samples {known.samples},"
    if known.mode in ("stage1", "samples") and ckpt:  # its data options become the --data.* defaults
        model, saved = load_stage1(ckpt, what)
        data_defaults = data_options(saved, skip=SKIPPED_DATA_ARGS)
    elif known.mode == "samples" and known.samples and Path(known.samples).exists() and \
            not any(a.startswith("--data") for a in args):  # fmt: skip
        # a folder of images names no stage 1, so no data set: Fashion-MNIST, the parser's default, is a guess
        raise UserError(f"--samples {known.samples} names no stage 1 and so no data set to compare with: pass "
                        "--data.dataset (and --data.root) of the real images, or --ckpt STAGE1.ckpt")  # fmt: skip
    cfg = build_parser(data_defaults).parse_args(args)
    result = run(cfg.mode, cfg[cfg.mode], model)
    if cfg[cfg.mode].json:
        write_json(cfg[cfg.mode].json, result)
        return f"written to {cfg[cfg.mode].json}"
    return None


def main(args: list[str] | None = None) -> None:
    run_command("evaluate", _run, args)


if __name__ == "__main__":
    main()
