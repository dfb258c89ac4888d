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
   end of training, the host reads the skip counter and the first bad step (the only sync) and
   raises ``NonFiniteError`` as the policy says.

The weights never take a non-finite value: a bad step is skipped on the device in both policies.
"""
from typing import Any, Callable, Dict, List, Literal, Optional, Tuple

import pytorch_lightning as pl
import torch
from torch import Tensor

Policy = Literal["skip", "stop"]
POLICIES = ("skip", "stop")
Reduce = Callable[[Tensor], Tensor]


class NonFiniteError(RuntimeError):
    """Training met non-finite losses or gradients and the policy says stop."""


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
        self._held_before: List[Tensor] = []
        self._armed: Optional[torch.optim.Optimizer] = None
        self._snapshot: List[Tuple[Tensor, Tensor, Dict[str, Tensor]]] = []
        self._steps_since_check = 0
        self._every = check_every or 1

    def start(self, device: torch.device, held: List[Tensor], loss_only: bool = False, check_every: int = 50) -> None:
        """Reset the counters on ``device`` for a new run.

        Args:
            device: where the counters live (the module's device).
            held: buffers a skipped step must not move (BatchNorm statistics, the DINO centre).
            loss_only: a ``GradScaler`` handles non-finite gradients: flag non-finite losses only.
            check_every: used when the constructor's ``check_every`` is ``None``.
        """
        self._every = self.check_every or check_every
        self.loss_only = loss_only
        self.bad = torch.zeros((), dtype=torch.bool, device=device)
        self.loss_bad = torch.zeros((), dtype=torch.bool, device=device)
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self.held = list(held)
        self._held_before = [t.detach().clone() for t in self.held]
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

    def read(self) -> Tuple[int, int]:
        """Host sync: ``(steps skipped since start, global step of the first, or -1)``."""
        self._steps_since_check = 0
        return int(self.skipped), int(self.first_bad)

    def check(self, last_checkpoint: str) -> None:
        """Read the counters (a host sync) and raise ``NonFiniteError`` if the policy says so.

        Args:
            last_checkpoint: path of the last checkpoint written, for the message ("" if none).
        """
        if not self.active:
            return
        skipped, first = self.read()
        if skipped == 0:
            return
        what = "non-finite loss" if self.loss_only else "non-finite loss or gradient norm"
        where = last_checkpoint or "no checkpoint yet"
        tail = (
            f"The weights are finite: the bad steps were skipped on the device. Last checkpoint: {where}. "
            "Lower the learning rate, check the data, or resume from that checkpoint."
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

    # -- the Lightning hooks -------------------------------------------------------------------------
    def on_train_start(self, trainer: "pl.Trainer", module: "pl.LightningModule") -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        held = [b for b in module.buffers() if b.is_floating_point()]  # BatchNorm statistics, DINO centre
        self.start(module.device, held, loss_only=scaler is not None, check_every=trainer.log_every_n_steps or 50)
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
        reduce = (lambda t: module.all_gather(t).amax()) if trainer.world_size > 1 else _identity
        _, norm = self.flag(grads, trainer.global_step, reduce)
        self.arm(optimizer)
        module.log_dict({"train/grad_norm": norm, "train/skipped_steps": self.skipped.float()},
                        on_step=True, on_epoch=False, batch_size=1)

    def on_train_batch_end(self, trainer: "pl.Trainer", module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._armed is not None:  # an optimiser step ran (not a micro-batch of accumulation)
            self.after_step()
        if self.due():
            self.check(last_checkpoint_path(trainer))

    def on_train_end(self, trainer: "pl.Trainer", module: "pl.LightningModule") -> None:
        self.check(last_checkpoint_path(trainer))
        self.stop()
        module.step_skipped = None

    def on_exception(self, trainer: "pl.Trainer", module: "pl.LightningModule", exception: BaseException) -> None:
        self.stop()
        module.step_skipped = None


def last_checkpoint_path(trainer: "pl.Trainer") -> str:
    """The most recent checkpoint of the trainer's checkpoint callback ("" if none yet)."""
    callback = trainer.checkpoint_callback
    if callback is None:
        return ""
    return getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "") or ""
