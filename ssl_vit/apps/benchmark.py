"""Training-throughput benchmark: full MAE or DINO training steps through the Lightning Trainer.

What is timed is what a user runs: the LightningModule's training step (forward, loss, backward,
optimiser step, the DINO teacher's EMA update), Lightning's own per-step work and, with real shards,
the DataModule and its augmentations. Warm-up steps are excluded and the device is synchronised at
both ends of the timed window. FLOPs per image are counted with ``torch.utils.flop_counter`` over one
eager training step (forward and backward); MFU divides the achieved model FLOP rate by a dense matrix
product peak measured on the same device in the same run (bf16 on CUDA, fp32 on CPU).
"""
import argparse
import gc
import json
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Dict, List, Optional

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from ssl_vit.apps import benchmark_data
from ssl_vit.data import PretrainTransform, ShardDataModule
from ssl_vit.data.gpu_augment import MultiCropCrops
from ssl_vit.data.multicrop import MultiCropTransform
from ssl_vit.methods.dino import DINO
from ssl_vit.methods.mae import MAE


@dataclass
class BenchConfig:
    method: str = "mae"
    arch: str = "vit_base_patch16"
    depth: Optional[int] = None  # blocks, overriding the arch's (quick runs; None: the paper's size)
    batch_size: int = 64
    steps: int = 20
    warmup: int = 5
    precision: str = "bf16-mixed"
    compile: bool = False
    grad_checkpointing: bool = False
    gpu_augment: bool = False
    sync_debug: bool = False
    device: str = "cuda"
    data: str = "synthetic"
    workers: int = 8
    img_size: int = 224
    mask_ratio: float = 0.75
    global_size: int = 224
    local_size: int = 96
    local_crops: int = 10
    out_dim: int = 65536

    def __post_init__(self) -> None:
        if self.method not in ("mae", "dino"):
            raise ValueError(f"--method must be 'mae' or 'dino', got {self.method!r}")
        if self.depth is not None and self.depth < 1:
            raise ValueError(f"--depth must be >= 1, got {self.depth}")
        for name in ("batch_size", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 1:
            raise ValueError(f"--warmup must be >= 1 (the first step compiles and allocates), got {self.warmup}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda asked for, but CUDA is not available here; use --device cpu")
        if self.sync_debug and self.device != "cuda":
            raise ValueError("--sync-debug checks CUDA host-device synchronisation: it needs --device cuda")
        if self.gpu_augment and (self.method != "dino" or self.data == "synthetic"):
            raise ValueError("--gpu-augment is DINO's device-side augmentation of real shards: use --method dino --data SHARDS")


def build_module(cfg: BenchConfig) -> pl.LightningModule:
    """The LightningModule at the reference settings (MAE: norm_pix_loss; DINO: K prototypes), with
    the speed switches of ``cfg`` (compiled blocks, activation checkpointing, device augmentation)."""
    # lr is absolute: throughput does not depend on it, and no datamodule batch size is needed
    speed = dict(lr=1e-4, compile_blocks=cfg.compile, grad_checkpointing=cfg.grad_checkpointing)
    if cfg.depth is not None:
        speed["depth"] = cfg.depth
    if cfg.method == "mae":
        return MAE(arch=cfg.arch, img_size=cfg.img_size, mask_ratio=cfg.mask_ratio, norm_pix_loss=True, **speed)

    return DINO(arch=cfg.arch, img_size=cfg.global_size, out_dim=cfg.out_dim, compile_augment=cfg.compile, **speed)


class _Synthetic(Dataset):
    """The same random batch on the device, every step (data cost zero, like the reference figures)."""
    def __init__(self, batch: Any, length: int) -> None:
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        return self.batch


def synthetic_loader(cfg: BenchConfig, length: int) -> DataLoader:
    device = torch.device(cfg.device)
    labels = torch.zeros(cfg.batch_size, dtype=torch.long, device=device)
    if cfg.method == "mae":
        images: Any = torch.randn(cfg.batch_size, 3, cfg.img_size, cfg.img_size, device=device)
    else:
        images = [torch.randn(cfg.batch_size, 3, cfg.global_size, cfg.global_size, device=device) for _ in range(2)]
        images += [torch.randn(cfg.batch_size, 3, cfg.local_size, cfg.local_size, device=device) for _ in range(cfg.local_crops)]
    return DataLoader(_Synthetic((images, labels), length), batch_size=None, shuffle=False)


def shard_datamodule(cfg: BenchConfig) -> pl.LightningDataModule:
    if cfg.method == "mae":
        transform: Any = PretrainTransform(size=cfg.img_size)
    else:
        crops = MultiCropCrops if cfg.gpu_augment else MultiCropTransform  # crops only, or everything on CPU
        transform = crops(global_size=cfg.global_size, local_size=cfg.local_size, num_local=cfg.local_crops)
    return ShardDataModule(train=cfg.data, batch_size=cfg.batch_size, num_workers=cfg.workers, train_transform=transform)


class _StepTimer(pl.Callback):
    """Wall time and peak memory of the steps after ``warmup``, device synchronised at both ends."""
    def __init__(self, warmup: int, steps: int, sync_debug: bool = False) -> None:
        self.warmup, self.steps, self.sync_debug = warmup, steps, sync_debug
        self.done = 0
        self.start: Optional[float] = None
        self.elapsed: Optional[float] = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.done += 1
        if self.done == self.warmup:
            _sync(pl_module.device)
            if pl_module.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(pl_module.device)
            self.start = time.perf_counter()
            if self.sync_debug:  # any host-device synchronisation from here on raises, with its stack
                torch.cuda.set_sync_debug_mode("error")
        elif self.done == self.warmup + self.steps:
            if self.sync_debug:
                torch.cuda.set_sync_debug_mode("default")
            _sync(pl_module.device)
            self.elapsed = time.perf_counter() - self.start


class _FlopCounter(pl.Callback):
    """Counts the FLOPs of one training step (forward + backward) inside the real training loop."""
    def __init__(self) -> None:
        self.mode: Optional[FlopCounterMode] = None
        self.flops = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self.mode = FlopCounterMode(display=False)
        self.mode.__enter__()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
            self.flops = self.mode.get_total_flops()
            self.mode = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_tflops(device: str) -> float:
    """Dense matrix-product rate measured here: bf16 8192^3 on CUDA, fp32 1024^3 on CPU (median of 10)."""
    dev = torch.device(device)
    n, dtype = (8192, torch.bfloat16) if dev.type == "cuda" else (1024, torch.float32)
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    times: List[float] = []
    for _ in range(10):
        _sync(dev)
        t0 = time.perf_counter()
        a @ b
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / sorted(times)[len(times) // 2] / 1e12


def _trainer(cfg: BenchConfig, max_steps: int, callbacks: List[pl.Callback]) -> pl.Trainer:
    return pl.Trainer(
        accelerator=cfg.device,
        devices=1,
        precision=cfg.precision,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )


def count_flops_per_image(cfg: BenchConfig) -> float:
    """GFLOP per image of one eager training step (forward + backward)."""
    counter = _FlopCounter()
    module = build_module(replace(cfg, compile=False))  # eager: the counter sees every operation
    _trainer(cfg, 1, [counter]).fit(module, train_dataloaders=synthetic_loader(cfg, 1))
    return counter.flops / cfg.batch_size / 1e9


def run_benchmark(cfg: BenchConfig) -> Dict[str, Any]:
    """Run the benchmark and return the result row (see the module docstring)."""
    gflop_per_img = count_flops_per_image(cfg)
    module = build_module(cfg)
    timer = _StepTimer(cfg.warmup, cfg.steps, cfg.sync_debug)
    total = cfg.warmup + cfg.steps
    trainer = _trainer(cfg, total, [timer])
    if cfg.data == "synthetic":
        trainer.fit(module, train_dataloaders=synthetic_loader(cfg, total))
    else:
        trainer.fit(module, datamodule=shard_datamodule(cfg))
    if timer.elapsed is None:
        raise RuntimeError(f"the run stopped after {timer.done} steps, before {total}: is the data too small?")
    img_per_s = cfg.steps * cfg.batch_size / timer.elapsed
    peak = matmul_peak_tflops(cfg.device)
    dev = torch.device(cfg.device)
    result: Dict[str, Any] = {
        "img_per_s": round(img_per_s, 2),
        "step_ms": round(1000 * timer.elapsed / cfg.steps, 3),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated(dev) / 2**30, 3) if dev.type == "cuda" else None,
        "gflop_per_img": round(gflop_per_img, 3),
        "mfu": round(gflop_per_img * img_per_s / 1e3 / peak, 4),
        "peak_tflops": round(peak, 2),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "settings": asdict(cfg),
    }
    return result


def find_max_batch(cfg: BenchConfig, limit: int = 8192) -> Dict[str, Any]:
    """The largest batch that trains without running out of device memory: doubling from
    ``cfg.batch_size``, then bisection; each try is a short run (1 warm-up + 2 timed steps). Returns
    the result row of the largest batch that fits, with ``max_batch`` added."""
    def fits(batch: int) -> Optional[Dict[str, Any]]:
        try:
            return run_benchmark(replace(cfg, batch_size=batch, warmup=1, steps=2))
        except torch.cuda.OutOfMemoryError:
            return None
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    low, high, best = 0, None, None
    batch = cfg.batch_size
    while high is None and batch <= limit:  # double until a batch does not fit
        row = fits(batch)
        if row is None:
            high = batch
        else:
            low, best, batch = batch, row, batch * 2
    if best is None:
        raise RuntimeError(f"batch {cfg.batch_size} already runs out of memory: start lower")
    while high is not None and high - low > max(1, low // 16):  # bisect to ~6%
        mid = (low + high) // 2
        row = fits(mid)
        low, best, high = (mid, row, high) if row is not None else (low, best, mid)
    return {**best, "max_batch": low}


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """``ssl-vit benchmark``: one training-throughput row; ``--data-only``: the input-pipeline benchmark
    (:mod:`ssl_vit.apps.benchmark_data`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--data-only" in argv:
        return benchmark_data.main([a for a in argv if a != "--data-only"])
    p = argparse.ArgumentParser(prog="ssl-vit benchmark", description=__doc__.splitlines()[0],
                                epilog="--data-only: the CPU input-pipeline benchmark (see --data-only --help)")
    defaults = argparse.Namespace(**{f.name: f.default for f in fields(BenchConfig)})
    p.add_argument("--method", choices=["mae", "dino"], required=True)
    p.add_argument("--arch", default=defaults.arch)
    p.add_argument("--depth", type=int, default=None, help="blocks, overriding the arch's (quick checks)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--warmup", type=int, default=defaults.warmup)
    p.add_argument("--precision", default=defaults.precision, help="Lightning precision: bf16-mixed, 16-mixed, 32")
    p.add_argument("--compile", action="store_true", help="torch.compile every block (and DINO's device augmentation)")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute the encoder blocks in backward")
    p.add_argument("--gpu-augment", action="store_true",
                   help="DINO with --data SHARDS: crops on CPU, colour/blur/solarise batched on the device")
    p.add_argument("--sync-debug", action="store_true",
                   help="fail on any host-device synchronisation in the timed steps (CUDA)")
    p.add_argument("--find-max-batch", action="store_true",
                   help="search the largest batch that fits in device memory, from --batch-size up")
    p.add_argument("--append", default=None, help="also append the JSON line to this file")
    p.add_argument("--device", default=defaults.device, choices=["cuda", "cpu"])
    p.add_argument("--data", default="synthetic", help="'synthetic' or a shard pattern (with its JSON beside it)")
    p.add_argument("--workers", type=int, default=defaults.workers)
    p.add_argument("--img-size", type=int, default=defaults.img_size, help="MAE input size")
    p.add_argument("--mask-ratio", type=float, default=defaults.mask_ratio)
    p.add_argument("--global-size", type=int, default=defaults.global_size, help="DINO global crop size")
    p.add_argument("--local-size", type=int, default=defaults.local_size, help="DINO local crop size")
    p.add_argument("--local-crops", type=int, default=defaults.local_crops)
    p.add_argument("--out-dim", type=int, default=defaults.out_dim, help="DINO prototypes K")
    args = p.parse_args(argv)
    append, search = args.__dict__.pop("append"), args.__dict__.pop("find_max_batch")
    try:
        cfg = BenchConfig(**{k: v for k, v in vars(args).items()})
    except ValueError as err:
        p.error(str(err))
    if search and cfg.device != "cuda":
        p.error("--find-max-batch searches device memory: it needs --device cuda")
    result = find_max_batch(cfg) if search else run_benchmark(cfg)
    print(json.dumps(result), flush=True)
    if append:
        with open(append, "a") as f:
            f.write(json.dumps(result) + "\n")
    return result
