"""`train_stage2`: train a prior over stage-1 codes with LightningCLI.

    train_stage2 fit --config configs/stage2/fashion_mnist_transformer.yaml --data.codes_dir codes/
    train_stage2 fit --config configs/stage2/fashion_mnist_pixelcnn.yaml --data.codes_dir codes/

Codebook size, grid shape, number of classes and the codes' metadata are linked from the codes
directory into the model. At every ``--sample_every_n_epochs``-th validation a grid of samples
(one row per class when there are labels), decoded by the stage-1 checkpoint that meta.json names, goes
to the dashboard; after `fit` the best checkpoint is tested and ``samples.png`` lands in the run folder.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pytorch_lightning import Callback

from common.cli import UserError
from common.grids import make_grid, save_grid
from common.logging import lightning_info_hidden, log_image, metrics_step
from common.run_entry import train_main
from common.runs import VQGenCLI
from stage1_vqvae.model import VQModel, load_stage1
from stage2_prior.data import CodesDataModule
from stage2_prior.prior import Prior


def sample_grid_images(prior: Prior, vqvae: VQModel, per_row: int = 8, seed: int = 0) -> tuple[torch.Tensor, int]:
    """Images (n, C, H, W) for a grid with one row per class (or 8 unconditional rows), and its row length."""
    gen = torch.Generator(device=prior.device).manual_seed(seed)  # multinomial needs a generator on its device
    if prior.num_classes > 0:
        rows = min(prior.num_classes, 10)
        labels = torch.arange(rows).repeat_interleave(per_row).to(prior.device)
    else:
        rows, labels = 8, None
    codes = prior.sample(rows * per_row, labels, generator=gen)
    return vqvae.decode_codes(codes.to(vqvae.device)).cpu(), per_row


class SampleGrid(Callback):
    """Log a decoded sample grid at every N-th validation of this process (rank 0 only). It counted epochs, and
    the configs validate every val_check_interval steps: a grid came at every validation of some epochs and at
    none of the others (none at all in a run shorter than N epochs)."""

    def __init__(self, stage1_ckpt: str, every_n_validations: int) -> None:
        self.stage1_ckpt, self.every = stage1_ckpt, every_n_validations
        self._vqvae: VQModel | None = None
        self._validations = 0

    def vqvae(self, device: torch.device) -> VQModel:
        if self._vqvae is None:
            self._vqvae = load_stage1(self.stage1_ckpt, "the codes' stage-1 checkpoint")[0]
        return self._vqvae.to(device)

    def on_validation_epoch_end(self, trainer, pl_module: Prior) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or self.every <= 0:
            return
        self._validations += 1
        if self._validations % self.every:
            return
        images, per_row = sample_grid_images(pl_module, self.vqvae(pl_module.device))
        names = (pl_module.hparams.get("codes_meta") or {}).get("class_names") or []
        caption = f"rows: {', '.join(names[:10])}" if pl_module.num_classes > 0 and names else ""  # which is which
        log_image(trainer.logger, "samples", make_grid(images, nrow=per_row, scale=2), metrics_step(trainer), caption)


class Stage2CLI(VQGenCLI):
    checkpoint_kind = "prior"
    # the codes it was trained on: another grid failed in load_state_dict (a traceback), and codes of another
    # stage 1 of the same grid were taken silently, though each code means something else there
    data_linked = ("codebook_size", "grid_shape", "num_classes", "stage 1")
    data_advice = ("pass the codes it was trained on (--data.codes_dir; its run's config.yaml names them), or train "
                   "a new prior on these codes without --ckpt_path")  # fmt: skip

    def linked_values(self, hparams: dict) -> dict:
        values = super().linked_values(hparams)
        if sha := (hparams.get("codes_meta") or {}).get("stage1_sha256"):
            values["stage 1"] = f"SHA-256 {sha[:12]}"
        return values

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument("--sample_every_n_epochs", type=int, default=1,
                            help="log a decoded sample grid at every N-th validation (0: never; the configs "
                                 "validate every --trainer.val_check_interval steps)")  # fmt: skip
        for src, dst in [("codebook_size", "codebook_size"), ("grid_shape", "grid_shape"),
                         ("num_classes", "num_classes"), ("meta_dict", "codes_meta")]:  # fmt: skip
            parser.link_arguments(f"data.{src}", f"model.{dst}", apply_on="instantiate")

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        every = self._get(self.config, "sample_every_n_epochs", default=1)
        if isinstance(every, bool) or not every >= 0:  # -1 was taken (a grid at every validation)
            raise UserError(f"--sample_every_n_epochs must be an integer >= 0 (0: never), got {every}")
        if self.run_dir is not None and every:
            trainer.callbacks.append(SampleGrid(self.datamodule.stage1_ckpt, every))
        return trainer

    def after_fit(self) -> None:
        super().after_fit()
        if self.run_dir is None:
            return
        # "best" exists only if a validation ran (max_steps can end the run before the first one). Its path, not
        # "best": with last.ckpt's callback beside it, Lightning would warn that it picks the first of two.
        checkpoint = self.trainer.checkpoint_callback
        best = checkpoint.best_model_path
        # Lightning says "Restoring states from the checkpoint path ..." here, which reads like a resume: the
        # line below names the weights tested instead (a resumed fit's own restore lines are untouched)
        with lightning_info_hidden("Restoring states from the checkpoint path", "Loaded model weights from"):
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None, verbose=False)
        if not self.trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("test/")}
        score = checkpoint.best_model_score  # None when a resume into another folder restored only the path
        weights = ("the final weights: no validation ran" if not best else str(best) if score is None
                   else f"{Path(best).name}: {checkpoint.monitor} {float(score):.4f}")  # fmt: skip
        print("test: " + "  ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())) + f"  ({weights})", flush=True)
        vqvae = load_stage1(self.datamodule.stage1_ckpt, "the codes' stage-1 checkpoint")[0]
        images, per_row = sample_grid_images(self.model.cpu(), vqvae)
        path = self.run_dir / "samples.png"
        save_grid(images, path, nrow=per_row, scale=2)
        print(f"samples: {path}", flush=True)


def main(args: list[str] | None = None) -> None:
    train_main("train_stage2", Stage2CLI, Prior, CodesDataModule, args)


if __name__ == "__main__":
    main()
