"""`train_stage1`: train the VQ-VAE with LightningCLI.

    train_stage1 fit --config configs/stage1/fashion_mnist.yaml
    train_stage1 fit --config configs/stage1/fashion_mnist.yaml --ckpt_path last   # resume

The data's channels and image size are linked into the model, never typed twice. After `fit`, the run
folder also gets `reconstructions.png` (test originals on top, reconstructions below).
"""

from __future__ import annotations

import torch
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger

from common.datamodule import ImageDataModule
from common.grids import save_grid
from common.images import from_uint8
from common.logging import log_image
from common.run_entry import train_main
from common.runs import VQGenCLI
from stage1_vqvae.vqvae import VQVAE


class Stage1CLI(VQGenCLI):
    checkpoint_kind = "stage1"
    data_linked = ("image_size", "in_channels")
    data_advice = "pass its run's config (config.yaml beside its checkpoints) or the same --data.image_size / channels"

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.link_arguments("data.channels", "model.in_channels", apply_on="instantiate")
        parser.link_arguments("data.image_size", "model.image_size", apply_on="instantiate")

    def after_fit(self) -> None:
        super().after_fit()
        if self.run_dir is None or not self.trainer.is_global_zero:
            return
        images, _ = self.datamodule.split_arrays("test")
        x = from_uint8(images[:16]).to(self.model.device)
        model = self.model.eval()
        with torch.no_grad():
            recon = model.decode_codes(model.encode_to_codes(x))
        path = self.run_dir / "reconstructions.png"
        grid = save_grid(torch.cat([x[:8], recon[:8], x[8:], recon[8:]]).cpu(), path, nrow=8, scale=2)
        print(f"originals vs reconstructions: {path}", flush=True)
        if isinstance(self.trainer.logger, (WandbLogger, TensorBoardLogger)):  # the CSV logger's folder has the file
            log_image(self.trainer.logger, "test/originals_vs_reconstructions", grid, self.trainer.global_step,
                      "rows 1 and 3: test originals, rows 2 and 4: their reconstructions")  # fmt: skip


def main(args: list[str] | None = None) -> None:
    train_main("train_stage1", Stage1CLI, VQVAE, ImageDataModule, args)


if __name__ == "__main__":
    main()
