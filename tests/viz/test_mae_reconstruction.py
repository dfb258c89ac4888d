"""Reconstruction pictures and the callback that logs them."""
import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from ssl_vit.methods.mae import MAE
from ssl_vit.viz import ReconstructionLogger
from ssl_vit.viz.reconstruction import mask_noise, reconstruction_grid, reconstruction_panels, visualize_mae

TINY = dict(arch="vit_tiny_patch4_32", img_size=16, embed_dim=32, depth=1, num_heads=2,
            decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def test_panels_show_original_masked_reconstruction_and_pasted():
    torch.manual_seed(0)
    model = MAE(**TINY, norm_pix_loss=True).train()
    images = torch.randn(2, 3, 16, 16)
    noise = mask_noise(2, 16, seed=1)
    panels = reconstruction_panels(model, images, 0.75, MEAN, STD, noise)
    assert panels.shape == (2, 4, 3, 16, 16) and model.training  # mode restored
    original, masked, recon, pasted = panels.unbind(1)
    display = (images * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)).clamp(0, 1)
    torch.testing.assert_close(original, display)
    model.eval()
    pred, mask = model.reconstruct(images, 0.75, noise)
    hidden = mask.view(2, 4, 4).repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).expand(-1, 3, -1, -1).bool()
    assert hidden.sum() == 2 * 12 * 16 * 3
    assert (masked[hidden] == 0.5).all() and torch.equal(masked[~hidden], original[~hidden])
    assert torch.equal(pasted[~hidden], original[~hidden]) and torch.equal(pasted[hidden], recon[hidden])
    expected = (model.predictions_to_images(pred, images) * torch.tensor(STD).view(1, 3, 1, 1)
                + torch.tensor(MEAN).view(1, 3, 1, 1)).clamp(0, 1)
    torch.testing.assert_close(recon, expected)
    grid = reconstruction_grid(model, images, 0.75, MEAN, STD, noise)
    assert grid.shape == (3, 2 * 18 + 2, 4 * 18 + 2)


class _Recorder(ReconstructionLogger):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.rendered = []

    def on_train_epoch_end(self, trainer, pl_module):
        super().on_train_epoch_end(trainer, pl_module)
        self.rendered.append(self.fixed_images().clone())


def test_callback_writes_a_png_per_epoch_from_fixed_validation_images(tmp_path):
    torch.manual_seed(0)
    train = TensorDataset(torch.randn(8, 3, 16, 16), torch.zeros(8, dtype=torch.long))
    val = TensorDataset(torch.randn(6, 3, 16, 16), torch.zeros(6, dtype=torch.long))
    callback = _Recorder(every_n_epochs=1, num_images=5)
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, callbacks=[callback])
    trainer.fit(MAE(**TINY, lr=1e-3), DataLoader(train, batch_size=4), DataLoader(val, batch_size=2))
    for epoch in (0, 1):
        with Image.open(tmp_path / "reconstructions" / f"epoch_{epoch:03d}.png") as image:
            # the grid (4 panels x 5 images of 16 px, padding 2) enlarged 4x (nearest) so that
            # "reconstruction" fits above its column, under a 14-px header of column names
            width, height = image.size
            assert width % (4 * 18 + 2) == 0 and (height - 14) / (5 * 18 + 2) == width / (4 * 18 + 2) > 1
            header = np.asarray(image.convert("L"))[:14]
            assert (header < 128).any() and (header == 255).mean() > 0.5  # dark label text on white
    assert len(callback.rendered) == 2
    assert torch.equal(callback.rendered[0], val.tensors[0][:5]) and torch.equal(callback.rendered[1], val.tensors[0][:5])


def test_visualize_mae_shows_a_bar_of_the_images_reconstructed(tmp_path, capsys):
    torch.manual_seed(0)
    model = MAE(**TINY)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, tmp_path / "mae.ckpt")
    for i in range(3):
        Image.fromarray(np.full((20, 20, 3), 40 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
    images = [tmp_path / f"{i}.png" for i in range(3)]
    written = visualize_mae(tmp_path / "mae.ckpt", images, tmp_path / "out", per_page=2)
    assert [p.name for p in written] == ["reconstructions_000.png", "reconstructions_001.png"]
    err = capsys.readouterr().err
    assert "MAE reconstructions" in err and "3/3" in err
    visualize_mae(tmp_path / "mae.ckpt", images, tmp_path / "quiet", progress=False)
    assert "MAE reconstructions" not in capsys.readouterr().err
