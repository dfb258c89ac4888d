"""ViTFSDP (ssl_vit/training/strategies.py): what it wraps, what it refuses, and 2 CPU processes of the MAE
smoke recipe under it against the same run under DDP, and its checkpoint loaded strictly.

FSDP is CUDA-only through Lightning (see ssl_vit/training/strategies.py); the runs here use
``tests/fsdp_cpu.py``, which differs from ``ViTFSDP`` only in handing torch ``device_id=cpu``.
"""
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, NamedTuple

import pytest
import pytorch_lightning as pl
import torch
import yaml
from dist_helpers import ROOT, Shards, clean_env, write_indexed_shards
from pytorch_lightning.plugins.precision import FSDPPrecision
from timm.models.vision_transformer import Block
from torch.distributed.fsdp import ShardingStrategy

from ssl_vit.checkpoints.mae import load_mae
from ssl_vit.cli import main as cli_main
from ssl_vit.methods.dino import DINO
from ssl_vit.models.dino_head import MultiCropNet
from ssl_vit.training.strategies import ViTFSDP, check_fsdp_compatible
from ssl_vit.viz import ReconstructionLogger

pytestmark = pytest.mark.slow  # processes, CLI training or end-to-end chains: `make test` only

SMOKE = str(ROOT / "ssl_vit" / "recipes" / "smoke" / "mae.yaml")
FRAGMENT = str(ROOT / "ssl_vit" / "recipes" / "strategies" / "fsdp.yaml")
TIMEOUT = 300


# -- the strategy object and the recipe switch (no processes) ---------------------------------------
def test_strategy_wraps_every_block_and_checkpoints_blocks_only():
    strategy = ViTFSDP(activation_checkpointing=True, sharding_strategy="SHARD_GRAD_OP")
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {Block, MultiCropNet}
    assert strategy.kwargs["use_orig_params"] is True  # parameter names and groups as in DDP
    assert strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == {Block}
    assert strategy.sharding_strategy == ShardingStrategy.SHARD_GRAD_OP
    assert ViTFSDP()._activation_checkpointing_kwargs == {}


@pytest.mark.filterwarnings("ignore:FSDP with `bf16-true`")
def test_bf16_mixed_reduces_gradients_and_keeps_buffers_in_float32():
    strategy = ViTFSDP()
    strategy.precision_plugin = FSDPPrecision("bf16-mixed")
    config = strategy.mixed_precision_config
    assert (config.param_dtype, config.reduce_dtype, config.buffer_dtype) == (torch.bfloat16, torch.float32, torch.float32)
    strategy.precision_plugin = FSDPPrecision("bf16-true")  # the others: Lightning's config
    assert strategy.mixed_precision_config.reduce_dtype == torch.bfloat16


def test_lightning_accepts_the_subclass_where_it_refuses_fsdp_on_cpu():
    with pytest.raises(ValueError, match="requires a GPU accelerator"):  # Lightning: the "fsdp" name needs CUDA
        pl.Trainer(accelerator="cpu", devices=2, strategy="fsdp")
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=ViTFSDP(), logger=False)
    assert isinstance(trainer.strategy, ViTFSDP)


@pytest.mark.parametrize("switch", [
    ["--config", FRAGMENT],
    ["--trainer.strategy.class_path", "ssl_vit.training.strategies.ViTFSDP",
     "--trainer.strategy.init_args.activation_checkpointing", "true"],
])
def test_recipe_switch_parses_over_the_vit_huge_recipe(switch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(ROOT / "ssl_vit/recipes/mae/vit_huge_patch14_in1k.yaml"), *switch, "--print_config"])
    assert exit_info.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    strategy = config["trainer"]["strategy"]
    assert strategy["class_path"] == "ssl_vit.training.strategies.ViTFSDP"
    assert strategy["init_args"]["activation_checkpointing"] is True
    assert config["model"]["init_args"]["arch"] == "vit_huge_patch14"
    if "--config" in switch:  # the fragment drops the callbacks FSDP refuses
        assert [c["class_path"] for c in config["trainer"]["callbacks"]] == ["ssl_vit.training.Checkpoint"] * 2


TINY_DINO = dict(arch="vit_tiny_patch4_32", img_size=32, embed_dim=32, depth=1, num_heads=2, out_dim=16,
                 head_hidden_dim=16, head_bottleneck_dim=8)


@pytest.mark.parametrize("case, message", [
    ("reconstructions", "ReconstructionLogger"),
    ("dino_clip", "clip_grad=3.0"),
    ("dino_freeze", "freeze_last_layer=1"),
])
def test_what_fsdp_cannot_do_is_refused_at_start(case, message):
    callbacks = [ReconstructionLogger()] if case == "reconstructions" else []
    module = {
        "reconstructions": pl.LightningModule(),
        "dino_clip": DINO(**TINY_DINO, clip_grad=3.0, freeze_last_layer=0),
        "dino_freeze": DINO(**TINY_DINO, clip_grad=0.0, freeze_last_layer=1),
    }[case]
    with pytest.raises(ValueError, match=message):
        check_fsdp_compatible(SimpleNamespace(callbacks=callbacks, lightning_module=module))
    check_fsdp_compatible(SimpleNamespace(callbacks=[], lightning_module=DINO(**TINY_DINO, clip_grad=0.0, freeze_last_layer=0)))


# -- two CPU processes ------------------------------------------------------------------------------
class Run(NamedTuple):
    records: List[dict]
    run: Path


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Shards:
    return write_indexed_shards(tmp_path_factory.mktemp("fsdp_data"), num_samples=13, shard_size=5)


def fit(shards: Shards, tmp: Path, strategy: Dict, epochs: int, *extra: str) -> Run:
    """2 CPU processes of the MAE smoke recipe: lr and weight decay large enough that 2 steps move
    every parameter and that a weight-decay mistake shows; the recorder as the only callback."""
    run, record = tmp / "run", tmp / "record"
    recorder = {"class_path": "dist_callbacks.Recorder", "init_args": {"folder": str(record)}}
    command = [
        sys.executable, "-m", "ssl_vit", "fit", "--config", SMOKE, "--data.train", shards.pattern,
        "--model.lr", "1e-3", "--model.weight_decay", "0.5", "--trainer.devices", "2",
        "--trainer.strategy", json.dumps(strategy), "--trainer.max_epochs", str(epochs),
        "--trainer.default_root_dir", str(run), "--trainer.callbacks", json.dumps([recorder]), *extra,
    ]
    result = subprocess.run(command, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-6000:]
    return Run([torch.load(record / f"rank{r}.pt", weights_only=True) for r in range(2)], run)


FSDP = {"class_path": "fsdp_cpu.CPUViTFSDP", "init_args": {"activation_checkpointing": True}}


@pytest.fixture(scope="module")
def ddp_run(shards, tmp_path_factory) -> Run:
    return fit(shards, tmp_path_factory.mktemp("ddp"), {"class_path": "pytorch_lightning.strategies.DDPStrategy"}, 1)


@pytest.fixture(scope="module")
def fsdp_run(shards, tmp_path_factory) -> Run:
    return fit(shards, tmp_path_factory.mktemp("fsdp"), FSDP, 1)


def relative_difference(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor], start: Dict[str, torch.Tensor]) -> float:
    """``||a - b|| / ||a - start||`` over all floating-point tensors: the disagreement between two
    runs relative to how far training moved the parameters."""
    keys = [k for k in a if a[k].is_floating_point()]
    num = sum(float((a[k] - b[k]).double().norm() ** 2) for k in keys)
    den = sum(float((a[k] - start[k]).double().norm() ** 2) for k in keys)
    return (num / den) ** 0.5


def test_fsdp_trains_like_ddp(ddp_run, fsdp_run):
    ddp, fsdp = ddp_run.records[0], fsdp_run.records[0]
    # the same weight-decay groups as DDP (not every flat shard in the no-decay group)
    assert fsdp["param_groups"] == ddp["param_groups"] and [wd for _, wd in ddp["param_groups"]] == [0.5, 0.0]
    assert fsdp["end_step"] == ddp["end_step"] == 2
    torch.testing.assert_close(torch.tensor(fsdp["losses"]), torch.tensor(ddp["losses"]), rtol=1e-5, atol=1e-6)
    assert fsdp["params_end"].keys() == ddp["params_end"].keys()
    torch.testing.assert_close(fsdp["params_start"], ddp["params_start"], rtol=0, atol=0)
    # Adam magnifies float noise on near-zero gradients, so compare relative to the distance moved:
    # measured 2e-4 here (a weight-decay grouping error gives 7e-2)
    assert relative_difference(fsdp["params_end"], ddp["params_end"], ddp["params_start"]) < 1e-2
    assert fsdp_run.records[0]["batches"] == ddp_run.records[0]["batches"]  # the same data per rank


def test_fsdp_checkpoint_is_one_ordinary_file_that_loads_strictly(ddp_run, fsdp_run):
    (ckpt,) = (fsdp_run.run / "checkpoints").glob("*.ckpt")
    (ddp_ckpt,) = (ddp_run.run / "checkpoints").glob("*.ckpt")
    saved = torch.load(ckpt, weights_only=True)
    assert saved["state_dict"].keys() == torch.load(ddp_ckpt, weights_only=True)["state_dict"].keys()
    final = fsdp_run.records[0]["params_end"]
    for key, value in saved["state_dict"].items():
        assert torch.equal(value, final[key]), key
    mae = load_mae(ckpt)  # strict keys and shapes
    assert torch.equal(mae.encoder.vit.blocks[0].attn.qkv.weight, final["encoder.vit.blocks.0.attn.qkv.weight"])
    assert saved["optimizer_states"][0]["state"]  # the full optimiser state, for a resume
