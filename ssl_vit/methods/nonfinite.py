"""Non-finite steps: a NaN/inf loss or gradient norm is detected on the device and the optimiser step
is skipped there, with no per-step host sync; the host reads the counters every ``check_every``
steps and applies the policy (``skip``: carry on, up to ``max_skipped_steps``; ``stop``: raise).

One optimiser step, as ``ScheduledModule`` drives it:

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
4. ``after_step``: remove ``found_inf`` / roll back, and roll back the held buffers (BatchNorm
   running statistics, the DINO centre), which moved during the forward pass. DINO's EMA teacher
   reads ``bad`` to hold still on a skipped step.
5. ``due`` / ``check`` (``on_train_batch_end``): every ``check_every`` optimiser steps, and at the
   end of training, the host reads the skip counter and the first bad step (the only sync) and
   raises ``NonFiniteError`` as the policy says.

The weights never take a non-finite value: a bad step is skipped on the device in both policies.
"""
from typing import Callable, Dict, List, Literal, Optional, Tuple

import torch
from torch import Tensor

Policy = Literal["skip", "stop"]
POLICIES = ("skip", "stop")
Reduce = Callable[[Tensor], Tensor]


class NonFiniteError(RuntimeError):
    """Training met non-finite losses or gradients and the policy says stop."""


def _identity(t: Tensor) -> Tensor:
    return t


def validate_policy(on_nonfinite: str, max_skipped_steps: Optional[int], check_every: Optional[int]) -> None:
    """Raise ``ValueError`` naming the bad argument."""
    if on_nonfinite not in POLICIES:
        raise ValueError(f"on_nonfinite must be one of {POLICIES}, got {on_nonfinite!r}")
    for name, value, low in (("max_skipped_steps", max_skipped_steps, 0), ("nonfinite_check_every", check_every, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ValueError(f"{name} must be None or an integer >= {low}, got {value!r}")


def supports_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` honours ``optimizer.found_inf`` (torch's fused optimisers; the
    same test ``GradScaler.step`` and Lightning use)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def keep_if_(bad: Tensor, now: List[Tensor], before: List[Tensor]) -> None:
    """``now <- before where bad else now``, in place, on the device (NaN-safe, unlike a lerp)."""
    for t, old in zip(now, before):
        t.copy_(torch.where(bad, old, t))


class NonFiniteGuard:
    """Device-side detection and skipping of non-finite optimiser steps (see the module docstring).

    Args:
        policy: ``"skip"`` (skip and count bad steps) or ``"stop"`` (skip, then raise at the next check).
        max_skipped_steps: under ``"skip"``, raise once more steps than this were skipped since the
            run (re)started; ``None``: never.
        check_every: optimiser steps between host reads of the counters; ``None``: the value
            ``start`` is given.
    """

    def __init__(
        self, policy: Policy = "skip", max_skipped_steps: Optional[int] = None, check_every: Optional[int] = None
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
                f"{what} at global step {first} (on_nonfinite='stop'; {skipped} step(s) skipped so far). {tail}"
            )
        if self.max_skipped_steps is not None and skipped > self.max_skipped_steps:
            raise NonFiniteError(
                f"{skipped} optimiser steps had a {what} (the first at global step {first}), more than "
                f"max_skipped_steps={self.max_skipped_steps}. {tail}"
            )
