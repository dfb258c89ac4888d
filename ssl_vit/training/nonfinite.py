"""Non-finite steps: a NaN/inf loss or gradient norm is detected on the device and the optimiser step
is skipped there, with no per-step host sync; the host reads the counters every ``check_every``
steps and applies the policy (``skip``: carry on, up to ``max_skipped_steps``; ``stop``: raise).

``NonFiniteGuard`` is a Lightning callback, opt-in (``ssl-vit fit`` always adds it: the ``nonfinite``
section of a recipe configures it). One optimiser step, as its hooks drive it:

1. ``observe_loss`` (every micro-batch, ``on_before_backward``): ``loss_bad |= ~isfinite(loss)``.
2. ``flag`` (``on_before_optimizer_step``, gradients unscaled): ``bad = loss_bad | ~isfinite(||g||)``
   with ``||g||`` the total L2 norm of all gradients (``torch.nn.utils.get_total_norm``, foreach
   kernels), then the max over processes, so every rank takes the same decision. Under a
   ``GradScaler`` only the loss counts: the scaler already skips steps with inf/NaN gradients (and
   they are routine in fp16 while the scale settles), so they are neither counted nor refused.
3. ``arm`` the optimiser: an optimiser whose kernels take ``found_inf`` (torch's fused AdamW / Adam /
   SGD: ``_step_supports_amp_scaling``) gets ``optimizer.found_inf = bad`` (float 0/1); the fused
   kernel then leaves parameters and moments untouched and ``_fused_adam`` takes the step counter
   back. Any other optimiser (LARS, non-fused SGD) is snapshotted (parameters with a gradient and
   their state) and rolled back after the step with ``torch.where(bad, before, after)``.
   The module's ``step_skipped`` is ``bad``: DINO's EMA teacher reads it to hold still.
4. ``after_step`` (``on_train_batch_end`` after a real optimiser step): remove ``found_inf`` / roll
   back, and roll back the held buffers (BatchNorm running statistics, the DINO centre), which
   moved during the forward pass.
5. ``due`` / ``check`` (``on_train_batch_end``): every ``check_every`` optimiser steps, and at the
   end of training, the host reads the skip counter, the first bad step and whether every weight
   the optimisers touch is finite (one foreach max-abs reduction over them, and the held buffers,
   on the device; all three come back in the only sync) and raises ``NonFiniteError`` as the
   policy says.

A step with a bad loss or gradient is skipped on the device in both policies, so it never reaches the
weights. An *update* can still make them non-finite with a finite loss and finite gradients (a
learning rate or weight decay too large for the model): that cannot be undone, so it always stops
the run, at the next check or at the next checkpoint save, whichever comes first. The guard checks
the weights before every checkpoint is written (``on_save_checkpoint``) and refuses to save
non-finite ones, and an error names a checkpoint to resume from only after reading it back and
finding every tensor in it finite.
"""
import os
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence, Tuple

import pytorch_lightning as pl
import torch
from torch import Tensor

from ssl_vit.checkpoints.io import count_non_finite, safe_torch_load

Policy = Literal["skip", "stop"]
POLICIES = ("skip", "stop")
Reduce = Callable[[Tensor], Tensor]


class NonFiniteError(RuntimeError):
    """Training met non-finite losses or gradients and the policy says stop, or the weights became
    non-finite."""


def _identity(t: Tensor) -> Tensor:
    return t


def validate_policy(policy: str, max_skipped_steps: Optional[int], check_every: Optional[int]) -> None:
    """Raise ``ValueError`` naming the bad argument."""
    if policy not in POLICIES:
        raise ValueError(f"NonFiniteGuard: policy must be one of {POLICIES}, got {policy!r}")
    for name, value, low in (("max_skipped_steps", max_skipped_steps, 0), ("check_every", check_every, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ValueError(f"NonFiniteGuard: {name} must be None or an integer >= {low}, got {value!r}")


def supports_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` honours ``optimizer.found_inf`` (torch's fused optimisers; the
    same test ``GradScaler.step`` and Lightning use)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def keep_if_(bad: Tensor, now: List[Tensor], before: List[Tensor]) -> None:
    """``now <- before where bad else now``, in place, on the device (NaN-safe, unlike a lerp)."""
    for t, old in zip(now, before):
        t.copy_(torch.where(bad, old, t))


class NonFiniteGuard(pl.Callback):
    """Device-side detection and skipping of non-finite optimiser steps (see the module docstring).

    Args:
        policy: what a step with a non-finite loss or gradient norm does: ``"skip"`` (the step is
            not applied and is counted) or ``"stop"`` (not applied; training then raises
            ``NonFiniteError`` at the next check, naming the step and the last checkpoint).
        max_skipped_steps: under ``"skip"``, raise once more steps than this were skipped since the
            run (re)started; ``None``: never.
        check_every: optimiser steps between the host reads of the counters (the only host sync);
            ``None``: ``trainer.log_every_n_steps``.

    Put it first in the trainer's callbacks (``ssl-vit`` does): its end-of-step roll-back must come
    before any other callback reads the state. Checkpoint callbacks run last anyway.
    """

    def __init__(
        self, policy: Policy = "skip", max_skipped_steps: Optional[int] = 100, check_every: Optional[int] = None
    ) -> None:
        validate_policy(policy, max_skipped_steps, check_every)
        self.policy, self.max_skipped_steps, self.check_every = policy, max_skipped_steps, check_every
        self.loss_only = False  # a GradScaler handles bad gradients itself
        self.bad: Optional[Tensor] = None  # bool [], this step's decision
        self.loss_bad: Optional[Tensor] = None  # bool [], any micro-batch loss non-finite
        self.skipped: Optional[Tensor] = None  # int64 [], steps skipped since start
        self.first_bad: Optional[Tensor] = None  # int64 [], global step of the first skip, -1: none
        self.held: List[Tensor] = []
        self.watched: List[Tensor] = []  # the parameters the optimisers update, and the held buffers
        self._reduce: Reduce = _identity
        self._checked_step = 0  # global step of the last host check
        self._held_before: List[Tensor] = []
        self._armed: Optional[torch.optim.Optimizer] = None
        self._snapshot: List[Tuple[Tensor, Tensor, Dict[str, Tensor]]] = []
        self._steps_since_check = 0
        self._every = check_every or 1

    def start(
        self, device: torch.device, held: List[Tensor], loss_only: bool = False, check_every: int = 50,
        params: Sequence[Tensor] = (), reduce: Reduce = _identity, step: int = 0,
    ) -> None:
        """Reset the counters on ``device`` for a new run.

        Args:
            device: where the counters live (the module's device).
            held: buffers a skipped step must not move (BatchNorm statistics, the DINO centre).
            loss_only: a ``GradScaler`` handles non-finite gradients: flag non-finite losses only.
            check_every: used when the constructor's ``check_every`` is ``None``.
            params: the parameters the optimisers update, checked finite (with ``held``) at every check.
            reduce: max over processes of a float tensor (identity on one process).
            step: the global step the run (re)starts at.
        """
        self._every = self.check_every or check_every
        self.loss_only = loss_only
        self.bad = torch.zeros((), dtype=torch.bool, device=device)
        self.loss_bad = torch.zeros((), dtype=torch.bool, device=device)
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self.held = list(held)
        self._held_before = [t.detach().clone() for t in self.held]
        self.watched = [p.detach() for p in params] + [t.detach() for t in self.held]
        self._reduce, self._checked_step = reduce, step
        self._steps_since_check = 0

    def stop(self) -> None:
        """Back to inactive (outside training): ``bad`` is None again."""
        self.bad = self.loss_bad = None

    @property
    def active(self) -> bool:
        return self.bad is not None

    def observe_loss(self, loss: Tensor) -> None:
        """Fold one micro-batch's loss into this step's flag (no sync)."""
        if self.active:
            self.loss_bad |= ~torch.isfinite(loss.detach()).all()

    @torch.no_grad()
    def flag(self, grads: List[Tensor], step: int, reduce: Reduce = _identity) -> Tuple[Tensor, Tensor]:
        """Decide this step: ``bad`` (bool ``[]``) and the total gradient norm (float32 ``[]``).

        Args:
            grads: every gradient the optimiser will use (unscaled).
            step: the global step, recorded as the first bad step if it is one.
            reduce: max over processes of a float tensor (identity on one process).
        """
        device = self.bad.device
        if grads:
            norm = torch.nn.utils.get_total_norm(grads).to(device=device, dtype=torch.float32)
        else:
            norm = torch.zeros((), device=device)
        bad = self.loss_bad if self.loss_only else self.loss_bad | ~torch.isfinite(norm)
        bad = reduce(bad.float()) > 0
        self.bad.copy_(bad)
        self.skipped += bad
        self.first_bad.copy_(torch.where(bad & (self.first_bad < 0), step, self.first_bad))
        return self.bad, norm

    @torch.no_grad()
    def arm(self, optimizer: torch.optim.Optimizer) -> None:
        """Make the coming ``optimizer.step`` a no-op when ``bad`` (no sync)."""
        self._armed = optimizer
        if supports_found_inf(optimizer):
            optimizer.found_inf = self.bad.float()  # a GradScaler, if any, replaces it with its own
            return
        # any other optimiser: snapshot what its step may change, to roll it back after
        self._snapshot = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    state = optimizer.state.get(p, {})
                    saved = {k: v.clone() for k, v in state.items() if torch.is_tensor(v) and v.device == p.device}
                    self._snapshot.append((p, p.detach().clone(), saved))

    @torch.no_grad()
    def after_step(self) -> None:
        """Undo what a skipped step changed; then clear this step's loss flag."""
        optimizer, self._armed = self._armed, None
        if optimizer is not None and supports_found_inf(optimizer):
            if hasattr(optimizer, "found_inf"):
                del optimizer.found_inf
        elif optimizer is not None:
            for p, old, saved in self._snapshot:
                p.copy_(torch.where(self.bad, old, p))
                for key, value in optimizer.state.get(p, {}).items():
                    if torch.is_tensor(value) and value.device == p.device:
                        # state the step created (a first step) is zeroed if that step was bad
                        before = saved[key] if key in saved else torch.zeros_like(value)
                        value.copy_(torch.where(self.bad, before, value))
            self._snapshot = []
        keep_if_(self.bad, self.held, self._held_before)
        for before, now in zip(self._held_before, self.held):
            before.copy_(now)
        self.loss_bad.zero_()
        self._steps_since_check += 1

    def due(self) -> bool:
        """Whether ``check_every`` optimiser steps passed since the last host check."""
        return self.active and self._steps_since_check >= self._every

    @torch.no_grad()
    def weights_bad(self) -> Tensor:
        """bool ``[]`` on the device: some watched weight holds a NaN or inf, on any process. One
        foreach max-abs reduction (an inf-norm cannot overflow, and NaN propagates through it)."""
        watched = [t for t in self.watched if t.numel()]  # FSDP leaves some ranks empty shards
        if not watched:
            return self._reduce(torch.zeros((), device=self.bad.device)) > 0
        peak = torch.nn.utils.get_total_norm(watched, norm_type=float("inf"))
        return self._reduce((~torch.isfinite(peak)).float().to(self.bad.device)) > 0

    def read(self) -> Tuple[int, int, bool]:
        """Host sync (one): ``(steps skipped since start, global step of the first or -1, whether
        every watched weight is finite)``."""
        self._steps_since_check = 0
        skipped, first, bad = torch.stack([self.skipped, self.first_bad, self.weights_bad().long()]).tolist()
        return skipped, first, not bad

    def check(self, step: int, checkpoints: Sequence[str] = ()) -> None:
        """Read the counters and the weights (a host sync) and raise ``NonFiniteError`` if the
        weights are non-finite, or if the policy says so.

        Args:
            step: the current global step, for the message.
            checkpoints: the run's checkpoint files, newest first: the message names the newest
                one read back finite (see :func:`resume_advice`).
        """
        if not self.active:
            return
        since, self._checked_step = self._checked_step, step
        skipped, first, weights_ok = self.read()
        if not weights_ok:
            raise NonFiniteError(
                f"the weights became non-finite between global steps {since} and {step}, {self._skips(skipped, first)}: "
                "an optimiser update made them so, which skipping steps cannot undo (a learning rate or weight decay "
                f"too large for this model?). {resume_advice(checkpoints)}"
            )
        if skipped == 0:
            return
        what = "non-finite loss" if self.loss_only else "non-finite loss or gradient norm"
        tail = (
            "The weights are finite (checked): the bad steps were skipped on the device. Lower the learning rate, "
            f"check the data, or resume from a checkpoint. {resume_advice(checkpoints)}"
        )
        if self.policy == "stop":
            raise NonFiniteError(
                f"{what} at global step {first} (policy='stop'; {skipped} step(s) skipped so far). {tail}"
            )
        if self.max_skipped_steps is not None and skipped > self.max_skipped_steps:
            raise NonFiniteError(
                f"{skipped} optimiser steps had a {what} (the first at global step {first}), more than "
                f"max_skipped_steps={self.max_skipped_steps}. {tail}"
            )

    def _skips(self, skipped: int, first: int) -> str:
        if skipped == 0:
            return "with every loss and gradient norm finite"
        return f"after {skipped} skipped step(s) (the first at global step {first})"

    # -- the Lightning hooks -------------------------------------------------------------------------
    def on_train_start(self, trainer: "pl.Trainer", module: "pl.LightningModule") -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        held = [b for b in module.buffers() if b.is_floating_point()]  # BatchNorm statistics, DINO centre
        params = list({id(p): p for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}.values())
        reduce = (lambda t: module.all_gather(t).amax()) if trainer.world_size > 1 else _identity
        self.start(module.device, held, loss_only=scaler is not None, check_every=trainer.log_every_n_steps or 50,
                   params=params, reduce=reduce, step=trainer.global_step)
        module.step_skipped = self.bad

    def on_before_backward(self, trainer: "pl.Trainer", module: "pl.LightningModule", loss: Tensor) -> None:
        self.observe_loss(loss)

    def on_before_optimizer_step(self, trainer: "pl.Trainer", module: "pl.LightningModule", optimizer: Any) -> None:
        """Decide on the device whether this step is applied (before the module's own hook clips
        or drops gradients), and log the total gradient norm."""
        if not self.active:
            return
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and supports_found_inf(optimizer):
            # Lightning leaves gradients scaled for optimisers that unscale in their step (fused);
            # unscale them now, so that norms and clipping see true values (the scaler's step
            # then uses grad_scale=None and the inf check of this call)
            scaler.unscale_(optimizer)
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        _, norm = self.flag(grads, trainer.global_step, self._reduce)
        self.arm(optimizer)
        module.log_dict({"train/grad_norm": norm, "train/skipped_steps": self.skipped.float()},
                        on_step=True, on_epoch=False, batch_size=1)

    def on_train_batch_end(self, trainer: "pl.Trainer", module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._armed is not None:  # an optimiser step ran (not a micro-batch of accumulation)
            self.after_step()
        if self.due():
            self.check(trainer.global_step, checkpoint_files(trainer))

    def on_save_checkpoint(self, trainer: "pl.Trainer", module: "pl.LightningModule", checkpoint: Dict[str, Any]) -> None:
        """Refuse to write a checkpoint of non-finite weights (every process calls this hook on every
        save, before anything is written): it could replace the last good one."""
        if self.active and bool(self.weights_bad()):
            raise NonFiniteError(
                f"not saving the checkpoint of global step {trainer.global_step}: the weights are non-finite (an "
                f"optimiser update made them so since global step {self._checked_step}, the last check). "
                f"{resume_advice(checkpoint_files(trainer))}"
            )

    def on_train_end(self, trainer: "pl.Trainer", module: "pl.LightningModule") -> None:
        self.check(trainer.global_step, checkpoint_files(trainer))
        self.stop()
        module.step_skipped = None

    def on_exception(self, trainer: "pl.Trainer", module: "pl.LightningModule", exception: BaseException) -> None:
        self.stop()
        module.step_skipped = None


def checkpoint_files(trainer: "pl.Trainer") -> List[str]:
    """The checkpoints the trainer's checkpoint callbacks know of (last, best, kept), newest first."""
    paths = set()
    for callback in trainer.checkpoint_callbacks:
        paths.update([getattr(callback, "last_model_path", ""), getattr(callback, "best_model_path", "")])
        paths.update(getattr(callback, "best_k_models", {}))
    found = [p for p in paths if p and os.path.exists(p)]
    return sorted(found, key=os.path.getmtime, reverse=True)


def resume_advice(checkpoints: Sequence[str]) -> str:
    """Which checkpoint to resume from: the newest of ``checkpoints`` that reads back with every
    weight and optimiser-state tensor finite (``count_non_finite``), naming those passed over and why. A
    sharded checkpoint (a folder) is not read back: the guard checked its weights when it was saved."""
    if not checkpoints:
        return "There is no checkpoint yet."
    rejected = []
    for path in checkpoints:
        if os.path.isdir(path):
            verdict = f"Resume from {path} (sharded: its weights were checked finite when it was saved)."
            return " ".join(rejected + [verdict])
        try:
            bad = count_non_finite(safe_torch_load(path))
        except (OSError, ValueError) as err:
            rejected.append(f"Do not resume from {path}: it cannot be read back ({err}).")
            continue
        if bad == 0:
            return " ".join(rejected + [f"Resume from {path} (read back: its weights and optimiser state are finite)."])
        rejected.append(f"Do not resume from {path}: it holds {bad} non-finite tensor(s).")
    return " ".join(rejected + ["No checkpoint of this run holds finite weights: start again."])
