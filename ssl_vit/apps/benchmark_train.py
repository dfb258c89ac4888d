"""Training-throughput benchmark: full MAE or DINO training steps through the Lightning Trainer.

What is timed is what a user runs: the LightningModule's training step (forward, loss, backward,
optimiser step, the DINO teacher's EMA update), Lightning's own per-step work and, with real shards,
the DataModule and its augmentations. Warm-up steps are excluded and the device is synchronised at
both ends of the timed window. FLOPs per image are counted with ``torch.utils.flop_counter`` over one
eager training step (forward and backward); MFU divides the achieved model FLOP rate by a dense matrix
product peak measured on the same device in the same run (bf16 on CUDA, fp32 on CPU).

FLOPs are counted as the ViT paper counts them: 2 per multiply-add (``FlopCounterMode`` does so).
``vit_forward_gflop`` is the backbone's forward pass on one full image, the paper's figure (ViT-B/16 at
224: about 35 GFLOPs); ``gflop_per_img`` is the whole training step, forward and backward.

Precision: ``bf16-mixed`` on CUDA, ``32-true`` on CPU unless ``--precision`` says otherwise (CPUs
without bf16 matrix units emulate it: one tiny MAE step took 111 s in bf16 on the 2-core machine).
"""
import contextlib
import gc
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Dict, List, Optional

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ssl_vit.apps.benchmark_data import TVDECODE
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
    precision: Optional[str] = None  # None: bf16-mixed on CUDA, 32-true on CPU
    compile: bool = False
    grad_checkpointing: bool = False
    gpu_augment: bool = False
    fast_data: bool = False  # shards: the transforms' speed switches (torch_resize, draft, JPEG decoder, fused_views)
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
    max_seconds: Optional[float] = None  # stop timing after this many seconds (at least one timed step)
    decoder_depth: Optional[int] = None  # MAE decoder blocks and width (quick runs; None: the paper's 8 x 512)
    decoder_dim: Optional[int] = None

    def __post_init__(self) -> None:
        if self.precision is None:
            self.precision = "bf16-mixed" if self.device == "cuda" else "32-true"
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
        if self.fast_data and self.data == "synthetic":
            raise ValueError("--fast-data switches the transforms that read real shards: use --data SHARDS")


def build_module(cfg: BenchConfig) -> pl.LightningModule:
    """The LightningModule at the reference settings (MAE: norm_pix_loss; DINO: K prototypes), with
    the speed switches of ``cfg`` (compiled blocks, activation checkpointing, device augmentation)."""
    # lr is absolute: throughput does not depend on it, and no datamodule batch size is needed
    speed = dict(lr=1e-4, compile_blocks=cfg.compile, grad_checkpointing=cfg.grad_checkpointing)
    if cfg.depth is not None:
        speed["depth"] = cfg.depth
    if cfg.method == "mae":
        decoder = {k: v for k, v in (("decoder_depth", cfg.decoder_depth), ("decoder_embed_dim", cfg.decoder_dim))
                   if v is not None}
        return MAE(arch=cfg.arch, img_size=cfg.img_size, mask_ratio=cfg.mask_ratio, norm_pix_loss=True, **decoder, **speed)

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
    """The shard data module; with ``fast_data`` the transforms' speed switches (docs/benchmarks.md),
    ``fused_views`` and ``uint8_views`` on the full CPU multi-crop."""
    fast = dict(TVDECODE) if cfg.fast_data else {}  # the switches of the data benchmark's fastest rows
    if cfg.method == "mae":
        transform: Any = PretrainTransform(size=cfg.img_size, **fast)
    elif cfg.gpu_augment:  # crops only: colour and blur on the device
        transform = MultiCropCrops(global_size=cfg.global_size, local_size=cfg.local_size, num_local=cfg.local_crops,
                                   **fast)
    else:  # everything on the CPU
        transform = MultiCropTransform(global_size=cfg.global_size, local_size=cfg.local_size,
                                       num_local=cfg.local_crops, fused_views=cfg.fast_data,
                                       uint8_views=cfg.fast_data, **fast)
    return ShardDataModule(train=cfg.data, batch_size=cfg.batch_size, num_workers=cfg.workers, train_transform=transform)


class _StepTimer(pl.Callback):
    """Wall time and peak memory of the steps after ``warmup``, device synchronised at both ends; with
    ``max_seconds``, timing (and training) stops at the first step end past that many seconds."""
    def __init__(self, warmup: int, steps: int, sync_debug: bool = False, max_seconds: Optional[float] = None) -> None:
        self.warmup, self.steps, self.sync_debug, self.max_seconds = warmup, steps, sync_debug, max_seconds
        self.done = 0
        self.timed = 0
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
        elif self.start is not None and self.elapsed is None:
            over = self.max_seconds is not None and time.perf_counter() - self.start >= self.max_seconds
            if self.done == self.warmup + self.steps or over:
                if self.sync_debug:
                    torch.cuda.set_sync_debug_mode("default")
                _sync(pl_module.device)
                self.elapsed = time.perf_counter() - self.start
                self.timed = self.done - self.warmup
                trainer.should_stop = True


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
    with _countable_attention(cfg.device):
        _trainer(cfg, 1, [counter]).fit(module, train_dataloaders=synthetic_loader(cfg, 1))
    return counter.flops / cfg.batch_size / 1e9


def _countable_attention(device: str) -> Any:
    """On CPU, attention through SDPA's math backend: ``FlopCounterMode`` counts the fused CUDA
    attention kernels but not the CPU one, whose matrix products (1.4 of ViT-B/16's 35.1 forward
    GFLOPs) would go uncounted. CUDA keeps its fused kernels (the math one needs far more memory)."""
    return sdpa_kernel(SDPBackend.MATH) if torch.device(device).type == "cpu" else contextlib.nullcontext()


def vit_forward_gflop(cfg: BenchConfig) -> float:
    """GFLOPs (2 per multiply-add) of the backbone's forward pass on one full-size image (the ViT
    paper's figure): the plain ViT of ``cfg.arch`` (and ``cfg.depth``) at the method's input size."""
    size = cfg.img_size if cfg.method == "mae" else cfg.global_size
    module = build_module(replace(cfg, compile=False, grad_checkpointing=False))
    vit = module.encoder.vit if cfg.method == "mae" else module.student.backbone  # the timm ViT of each
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        vit.forward_features(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def run_benchmark(cfg: BenchConfig) -> Dict[str, Any]:
    """Run the benchmark and return the result row (see the module docstring)."""
    gflop_per_img = count_flops_per_image(cfg)
    module = build_module(cfg)
    timer = _StepTimer(cfg.warmup, cfg.steps, cfg.sync_debug, cfg.max_seconds)
    total = cfg.warmup + cfg.steps
    trainer = _trainer(cfg, total, [timer])
    if cfg.data == "synthetic":
        trainer.fit(module, train_dataloaders=synthetic_loader(cfg, total))
    else:
        trainer.fit(module, datamodule=shard_datamodule(cfg))
    if timer.elapsed is None:
        raise RuntimeError(f"the run stopped after {timer.done} steps, before {total}: is the data too small?")
    img_per_s = timer.timed * cfg.batch_size / timer.elapsed
    peak = matmul_peak_tflops(cfg.device)
    dev = torch.device(cfg.device)
    result: Dict[str, Any] = {
        "img_per_s": round(img_per_s, 2),
        "step_ms": round(1000 * timer.elapsed / timer.timed, 3),
        "timed_steps": timer.timed,
        "peak_mem_gib": round(torch.cuda.max_memory_allocated(dev) / 2**30, 3) if dev.type == "cuda" else None,
        "gflop_per_img": round(gflop_per_img, 3),
        "vit_forward_gflop": round(vit_forward_gflop(cfg), 3),
        "mfu": round(gflop_per_img * img_per_s / 1e3 / peak, 4),
        "peak_tflops": round(peak, 2),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "settings": asdict(cfg),
    }
    return result


def find_max_batch(cfg: BenchConfig, limit: int = 8192) -> Dict[str, Any]:
    """The largest batch up to ``limit`` that trains without running out of device memory: doubling
    from ``cfg.batch_size``, then bisection; each try is a short run (1 warm-up + 2 timed steps).
    Returns the result row of the largest batch that fits, with ``max_batch`` added."""
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
