"""Weighted k-NN against a brute-force loop, feature extraction, cross-rank gathering, the KNNEval
stage and the KNNMonitor callback through real Trainers."""
import threading

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ssl_vit.checkpoints.format import find_backbone
from ssl_vit.eval.distributed import gather_rows, split_for_rank
from ssl_vit.eval.features import check_feature, extract_features, vit_features
from ssl_vit.eval.knn import knn_classify
from ssl_vit.methods.knn import KNNEval
from ssl_vit.models.backbone import create_backbone
from ssl_vit.training.knn_monitor import KNNMonitor

TINY = dict(embed_dim=32, depth=2, num_heads=2)


def brute_force_knn(bank, bank_labels, queries, num_classes, k, temperature):
    scores = torch.zeros(len(queries), num_classes, dtype=torch.float64)
    bank = bank.double() / bank.double().norm(dim=1, keepdim=True)
    for i, q in enumerate(queries.double()):
        q = q / q.norm()
        sims = [(float(q @ b), int(label)) for b, label in zip(bank, bank_labels)]
        sims.sort(key=lambda s: -s[0])
        for sim, label in sims[:k]:
            scores[i, label] += torch.exp(torch.tensor(sim / temperature, dtype=torch.float64))
    return scores


@pytest.mark.parametrize("chunk_size,bank_chunk_size", [(4096, 65536), (3, 5), (1, 1)])
def test_knn_matches_brute_force(chunk_size, bank_chunk_size):
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(37, 8, generator=g) * 3, torch.randn(11, 8, generator=g)
    labels = torch.randint(0, 4, (37,), generator=g)
    for k in (1, 5, 20, 100):  # 100 > bank size: every entry votes
        scores = knn_classify(bank, labels, queries, 4, k=k, temperature=0.07, chunk_size=chunk_size, bank_chunk_size=bank_chunk_size)
        expected = brute_force_knn(bank, labels, queries, 4, min(k, 37), 0.07)
        torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=1e-6)
        assert torch.equal(scores.argmax(1), expected.argmax(1))


def test_knn_rejects_bad_input():
    bank, labels = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    with pytest.raises(ValueError, match="labels must be in \\[0, 2\\)"):
        knn_classify(bank, labels, torch.randn(2, 4), num_classes=2)
    with pytest.raises(ValueError, match="\\[N, F\\] and \\[Q, F\\]"):
        knn_classify(bank, labels, torch.randn(2, 3), num_classes=3)


def manual_tokens(model, images, norm=True):
    """Every block's output (after the final norm), written out from the public modules."""
    x = model.patch_embed(images).flatten(1, 2)  # [B, N, D] (NHWC with dynamic_img_size)
    x = torch.cat([model.cls_token.expand(len(x), -1, -1), x], dim=1) + model.pos_embed
    outs = []
    for block in model.blocks:
        x = block(x)
        outs.append(model.norm(x) if norm else x)
    return outs


def test_vit_features_match_manual_computation():
    torch.manual_seed(0)
    model = create_backbone("vit_tiny_patch4_32", **TINY).eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        outs = manual_tokens(model, images)
        torch.testing.assert_close(vit_features(model, images, "cls"), outs[-1][:, 0])
        torch.testing.assert_close(vit_features(model, images, "cls"), model(images))
        torch.testing.assert_close(vit_features(model, images, "cls", n_last_blocks=2), torch.cat([outs[0][:, 0], outs[1][:, 0]], 1))
        torch.testing.assert_close(vit_features(model, images, "avg"), outs[-1][:, 1:].mean(1))
        # DINO's avgpool layout: output.unsqueeze(-1) and mean.unsqueeze(-1) concatenated on the last
        # dim, then reshaped: channels interleaved, so released DINO linear heads apply unchanged
        cls, mean = outs[-1][:, 0], outs[-1][:, 1:].mean(1)
        interleaved = torch.cat([cls.unsqueeze(-1), mean.unsqueeze(-1)], dim=-1).reshape(3, -1)
        torch.testing.assert_close(vit_features(model, images, "cls_avg"), interleaved)
        assert torch.equal(vit_features(model, images, "cls_avg")[:, :4], torch.stack([cls[:, 0], mean[:, 0], cls[:, 1], mean[:, 1]], 1))
        # MAE's global pool: mean of the un-normed last block, then a fresh LayerNorm (eps 1e-6)
        x = manual_tokens(model, images, norm=False)[-1]
        fresh = torch.nn.LayerNorm(model.embed_dim, eps=1e-6)
        torch.testing.assert_close(vit_features(model, images, "gap"), fresh(x[:, 1:].mean(1)))
    for feature in ("avg", "gap", "cls_avg"):
        with pytest.raises(ValueError, match="n_last_blocks must be 1"):
            check_feature(model, feature, 2)


def test_gather_rows_across_simulated_ranks():
    """Two threads stand in for two ranks; all_gather stacks what each passed, like the real one."""
    world, slots, barrier = 2, [None, None], threading.Barrier(2)

    def make_all_gather(rank):
        def all_gather(t):
            slots[rank] = t.clone()
            barrier.wait()
            out = torch.stack(list(slots))
            barrier.wait()
            return out
        return all_gather

    parts = [torch.arange(5 * 3).view(5, 3).float(), 100 + torch.arange(2 * 3).view(2, 3).float()]
    results = [None, None]

    def run(rank):
        results[rank] = gather_rows(parts[rank], make_all_gather(rank), world, torch.device("cpu"), chunk=2)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in range(world):
        assert torch.equal(results[r], torch.cat(parts))


def test_split_for_rank_partitions_map_style_loaders():
    loader = DataLoader(TensorDataset(torch.arange(10), torch.arange(10)), batch_size=3, shuffle=True)
    seen = torch.cat([torch.cat([x for x, _ in split_for_rank(loader, r, 3)]) for r in range(3)])
    assert sorted(seen.tolist()) == list(range(10))
    assert split_for_rank(loader, 0, 1) is loader


class Clusters(pl.LightningDataModule):
    """Images whose class sets the mean colour: frozen ViT features separate them (k-NN is exact)."""

    def __init__(self, n_train=24, n_val=12, num_classes=3, batch_size=8):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.num_classes, self.batch_size = num_classes, batch_size

        def make(n):
            labels = torch.arange(n) % num_classes
            colours = torch.eye(3)[labels] * 2 - 1  # [n, 3]
            return TensorDataset(colours[:, :, None, None] + 0.3 * torch.randn(n, 3, 32, 32, generator=g), labels)

        self.train_set, self.val_set = make(n_train), make(n_val)

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size)


def expected_knn(model, dm, k=20, temperature=0.07):
    with torch.no_grad():
        bank = torch.cat([model(x) for x, _ in dm.train_dataloader()])
        queries = torch.cat([model(x) for x, _ in dm.val_dataloader()])
    bank_labels = torch.cat([y for _, y in dm.train_dataloader()])
    labels = torch.cat([y for _, y in dm.val_dataloader()])
    scores = brute_force_knn(bank, bank_labels, queries, dm.num_classes, min(k, len(bank)), temperature)
    top1 = (scores.argmax(1) == labels).double().mean().item()
    top2 = (scores.topk(2, 1).indices == labels[:, None]).any(1).double().mean().item()
    return top1, top2


def test_knn_eval_stage_through_trainer_validate(tmp_path):
    torch.manual_seed(0)
    backbone = create_backbone("vit_tiny_patch4_32", **TINY).eval()
    torch.save(backbone.state_dict(), tmp_path / "w.pth")
    dm = Clusters(num_classes=3)
    module = KNNEval(weights=str(tmp_path / "w.pth"), backbone_kwargs={"num_heads": 2}, k=5)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    metrics = trainer.validate(module, datamodule=dm, verbose=False)[0]
    top1, top3 = expected_knn(backbone, dm, k=5)
    assert metrics["val/knn_top1"] == pytest.approx(top1)
    assert top1 > 0.9  # the clusters are separable: a broken bank would not get there
    with pytest.raises(ValueError, match="num_classes=4 is given, but the datamodule has 3"):
        pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).validate(
            KNNEval(arch="vit_tiny_patch4_32", backbone_kwargs=TINY, num_classes=4), datamodule=dm, verbose=False)


class TinySSL(pl.LightningModule):
    """Stands in for DINO: a teacher backbone, trained (here: perturbed) every step."""

    BACKBONES = {"teacher": "teacher.backbone", "student": "student.backbone"}
    EVAL_BACKBONE = "teacher"

    def __init__(self):
        super().__init__()
        self.teacher = nn.Module()
        self.teacher.backbone = create_backbone("vit_tiny_patch4_32", **TINY)
        self.w = nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.w - 1).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD([self.w], lr=0.1)


def test_knn_monitor_logs_the_knn_accuracy_of_the_teacher():
    torch.manual_seed(0)
    module, dm = TinySSL(), Clusters(num_classes=3)
    monitor = KNNMonitor(train_loader=dm.train_dataloader(), val_loader=dm.val_dataloader(), every_n_epochs=2, k=20)
    assert find_backbone(module, "auto") is module.teacher.backbone
    train = DataLoader(TensorDataset(torch.zeros(4, 1), torch.zeros(4)), batch_size=2)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[monitor])
    trainer.fit(module, train_dataloaders=train)
    top1, top2 = expected_knn(module.teacher.backbone.eval(), dm, k=20)
    assert trainer.callback_metrics["val/knn_top1"].item() == pytest.approx(top1)  # the k-NN stage's name
    assert monitor.last["val/knn_top5"] == pytest.approx(1.0)  # 3 classes: top-5 is always right
    with pytest.raises(ValueError, match="both `train_loader` and `val_loader`, or neither"):
        KNNMonitor(train_loader=dm.train_dataloader())


@pytest.mark.parametrize("bar", [True, False])
def test_knn_monitor_shows_its_feature_extraction_when_the_run_has_a_bar(bar, capsys):
    module, dm = TinySSL(), Clusters(num_classes=3)
    monitor = KNNMonitor(train_loader=dm.train_dataloader(), val_loader=dm.val_dataloader(), k=5)
    train = DataLoader(TensorDataset(torch.zeros(2, 1), torch.zeros(2)), batch_size=2)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=bar,
                         enable_model_summary=False, callbacks=[monitor])
    trainer.fit(module, train_dataloaders=train)
    err = capsys.readouterr().err
    assert ("k-NN monitor: bank" in err and "k-NN monitor: queries" in err) == bar


def test_extract_features_refuses_multicrop_batches():
    loader = [([torch.zeros(2, 3, 8, 8)] * 2, torch.zeros(2))]
    with pytest.raises(TypeError, match="multi-crop"):
        extract_features(lambda x: x, loader)


def test_feature_extraction_shows_a_bar_when_asked(capsys):
    loader = [(torch.randn(2, 3), torch.tensor([0, 1])) for _ in range(3)]
    feats, labels = extract_features(lambda x: x, loader, progress="k-NN bank")
    assert feats.shape == (6, 3) and labels.tolist() == [0, 1] * 3
    assert "k-NN bank" in capsys.readouterr().err
    extract_features(lambda x: x, loader)
    assert "k-NN bank" not in capsys.readouterr().err
