"""Building blocks of end-to-end runs: `ssl-vit demo` and the CIFAR-10 quality benchmark use them.

* :func:`shard_pattern`: the brace pattern naming the shards ``write_shards`` wrote.
* :func:`run_cli`: one ``ssl-vit`` command (``fit --config ...``) in this process.
* :func:`run_cli_subprocess`: the same in a child ``python -m ssl_vit``, its output in a log file.
* :class:`StageError`: what both raise when a command fails, naming the stage.
* :func:`knn_accuracy`: weighted k-NN top-1 of any feature function over two image folders.
* :func:`split_features`: the features of a train and a test image folder, with their labels.
* :func:`knn_top1` and :func:`few_label_probe`: k-NN top-1 and a few-label linear probe on such
  features.
* :func:`backbone_features`: a frozen ViT as such a feature function.
"""
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from ssl_vit.cli import run_lightning
from ssl_vit.data import EvalTransform, ImageFolderDataModule
from ssl_vit.eval.features import extract_features, vit_features
from ssl_vit.eval.knn import knn_classify

PACKAGE_PARENT = Path(__file__).resolve().parents[2]  # the checkout (or site-packages) holding ssl_vit/
KNN_K, KNN_T = 20, 0.07


class StageError(RuntimeError):
    """A stage of an end-to-end run failed; the message names the stage (and its log, if any)."""


def shard_pattern(info: Mapping[str, Any], folder: Path) -> str:
    """``folder/train-{000000..000009}.tar`` (or the single file) for a ``write_shards`` info dict."""
    shards = info["shards"]
    if not shards:
        raise ValueError(f"no shards listed for {folder}")
    first, last = Path(shards[0]).stem, Path(shards[-1]).stem
    prefix, start = first.rsplit("-", 1)
    end = last.rsplit("-", 1)[1]
    return str(Path(folder) / (f"{prefix}-{start}.tar" if start == end else f"{prefix}-{{{start}..{end}}}.tar"))


def run_cli(args: List[str], stage: str = "ssl-vit") -> Any:
    """Run ``ssl-vit ARGS`` in this process and return the LightningCLI object.

    Raises:
        StageError: naming ``stage`` when the command exits with an error or raises.
    """
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when it also sees the caller's argv
    try:
        return run_lightning(args)
    except SystemExit as exc:  # jsonargparse exits on a bad recipe or key
        if exc.code not in (0, None):
            raise StageError(f"stage {stage!r} failed: `ssl-vit {shlex.join(args)}` exited with {exc.code}") from exc
        raise
    except Exception as exc:
        raise StageError(f"stage {stage!r} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        sys.argv = argv


def _tail(path: Path, lines: int) -> str:
    """The last ``lines`` non-empty lines of a log (progress-bar carriage returns split lines)."""
    text = path.read_text(encoding="utf-8", errors="replace").replace("\r", "\n")
    return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])


def run_cli_subprocess(
    args: List[str], stage: str, log: Path, timeout: Optional[float] = None, env: Optional[Dict[str, str]] = None
) -> float:
    """Run ``python -m ssl_vit ARGS`` in a child process; stdout and stderr go to ``log``.

    The child runs from the directory holding the ``ssl_vit`` package (which it imports first), with
    ``WANDB_MODE=offline`` unless the environment says otherwise.

    Returns:
        The wall time of the child in seconds.

    Raises:
        StageError: naming ``stage``, the command, the exit code and the last lines of ``log`` when the
            child fails, or when it runs past ``timeout`` seconds.
    """
    command = [sys.executable, "-m", "ssl_vit", *args]
    child_env = {**os.environ, **(env or {})}
    child_env.setdefault("WANDB_MODE", "offline")
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_PARENT), child_env.get("PYTHONPATH", "")) if p)
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        out.write(f"$ {shlex.join(command)}\n")
        out.flush()
        try:
            done = subprocess.run(command, cwd=PACKAGE_PARENT, env=child_env, stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise StageError(f"stage {stage!r} ran past its {timeout:.0f} s limit: {shlex.join(command)} (log: {log})") from exc
    if done.returncode != 0:
        raise StageError(
            f"stage {stage!r} failed with exit code {done.returncode}: {shlex.join(command)}\n"
            f"last lines of {log}:\n{_tail(log, 25)}"
        )
    return time.perf_counter() - start


def image_loader(folder: Path, size: int, batch_size: int = 256, num_workers: int = 0) -> torch.utils.data.DataLoader:
    """Every image of an ImageFolder tree once, in order, un-augmented (``EvalTransform``, no crop)."""
    dm = ImageFolderDataModule(train=str(folder), val=str(folder), batch_size=batch_size, num_workers=num_workers,
                               pin_memory=False, val_transform=EvalTransform(size=size, crop_pct=1.0))
    dm.setup("validate")
    return dm.val_dataloader()


def split_features(
    feature_fn: Callable[[torch.Tensor], torch.Tensor], train: Path, test: Path, size: int, num_workers: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(train features [N, F], train labels [N], test features [M, F], test labels [M])`` of
    ``feature_fn`` (``[B, C, H, W] -> [B, F]``) over two ImageFolder trees resized to ``size``."""
    train_feats, train_labels = extract_features(feature_fn, image_loader(train, size, num_workers=num_workers))
    test_feats, test_labels = extract_features(feature_fn, image_loader(test, size, num_workers=num_workers))
    return train_feats, train_labels, test_feats, test_labels


def knn_top1(
    train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, test_labels: torch.Tensor,
    k: int = KNN_K, temperature: float = KNN_T,
) -> float:
    """Top-1 of the weighted k-NN classifier (cosine, votes ``exp(sim / T)``) of test on train."""
    num_classes = int(train_labels.max()) + 1
    scores = knn_classify(train_feats, train_labels, test_feats, num_classes, k=k, temperature=temperature)
    return float((scores.argmax(1) == test_labels).float().mean())


def knn_accuracy(
    feature_fn: Callable[[torch.Tensor], torch.Tensor], train: Path, test: Path, size: int,
    k: int = KNN_K, temperature: float = KNN_T, num_workers: int = 0,
) -> float:
    """Top-1 of the weighted k-NN classifier (cosine, votes ``exp(sim / T)``) of ``feature_fn``.

    Args:
        feature_fn: ``[B, C, H, W] -> [B, F]``.
        train: ImageFolder tree of the bank.
        test: ImageFolder tree of the queries (same classes).
        size: image side the images are resized to (no crop).
    """
    return knn_top1(*split_features(feature_fn, train, test, size, num_workers), k=k, temperature=temperature)


def few_label_probe(
    train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, test_labels: torch.Tensor,
    per_class: int = 5, draws: int = 10, seed: int = 0, C: float = 1.0,
) -> Dict[str, Any]:
    """Top-1 of a linear probe trained on ``per_class`` labelled images per class, over ``draws``
    random draws of those images (scikit-learn's multinomial logistic regression, L2 penalty ``C``).

    The frozen features are standardised first, with the mean and standard deviation of every
    training image (``StandardScaler``; no label is used): without it a linear probe on 50 examples
    sees mostly the features' common offset. Self-supervised features are often concentrated around
    one direction (all CLS tokens nearly parallel); L2 normalisation alone left the DINO demo's probe
    at 41% where standardised features give 70% (same checkpoint, 10 draws), and it changed
    raw pixels by nothing (82.1% both).

    Returns:
        ``{"mean", "std", "per_class", "draws", "accuracies"}`` (accuracies in [0, 1], one per draw).

    Raises:
        ValueError: when a class has fewer than ``per_class`` training samples, or for
            ``per_class`` / ``draws`` < 1.
    """
    if per_class < 1 or draws < 1:
        raise ValueError(f"few_label_probe needs per_class >= 1 and draws >= 1, got {per_class}, {draws}")
    scaler = StandardScaler().fit(train_feats.float().numpy())
    x_train, x_test = scaler.transform(train_feats.float().numpy()), scaler.transform(test_feats.float().numpy())
    y_train, y_test = train_labels.numpy(), test_labels.numpy()
    by_class = [np.flatnonzero(y_train == c) for c in np.unique(y_train)]
    short = [int(y_train[idx[0]]) for idx in by_class if len(idx) < per_class]
    if short:
        raise ValueError(f"few_label_probe: classes {short} have fewer than {per_class} training samples")
    rng = np.random.default_rng(seed)
    accuracies = []
    for _ in range(draws):
        chosen = np.concatenate([rng.choice(idx, per_class, replace=False) for idx in by_class])
        probe = LogisticRegression(C=C, max_iter=1000).fit(x_train[chosen], y_train[chosen])
        accuracies.append(float((probe.predict(x_test) == y_test).mean()))
    return {"mean": float(np.mean(accuracies)), "std": float(np.std(accuracies)), "per_class": per_class,
            "draws": draws, "accuracies": accuracies}


def backbone_features(model: torch.nn.Module, feature: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``images -> vit_features(model, images, feature)`` with ``model`` in eval mode."""
    model.eval()
    return lambda images: vit_features(model, images, feature=feature)
