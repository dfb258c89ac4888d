"""Stateless schedules: every value is a function of the optimiser step, precomputed as an array.

Arrays are sized from ``trainer.estimated_stepping_batches``, so resuming from a checkpoint (which
restores ``global_step``) continues every schedule exactly where it stopped.
"""
import math

import torch


def cosine_schedule(
    base: float, final: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0,
    warmup_reaches_base: bool = False,
) -> torch.Tensor:
    """Linear warm-up from ``warmup_start`` towards ``base`` over ``warmup_steps``, then a half cosine
    from ``base`` to ``final`` over the remaining steps.

    The two references differ in the warm-up's last value:

    * ``warmup_reaches_base=False`` (facebookresearch/mae ``adjust_learning_rate``, lr proportional
      to the fractional epoch): ``linspace(start, base, W + 1)[:-1]``, base is first reached by
      the cosine's first step;
    * ``warmup_reaches_base=True`` (facebookresearch/dino ``cosine_scheduler``):
      ``linspace(start, base, W)``, both ends included: the warm-up's last step is at ``base``.

    Returns:
        ``[total_steps]`` float64 tensor; index it with the global step.
    """
    if total_steps <= 0:
        raise ValueError(f"a schedule needs at least one step, got total_steps={total_steps}")
    warmup_steps = min(max(int(warmup_steps), 0), total_steps)
    if warmup_reaches_base:
        warmup = torch.linspace(warmup_start, base, warmup_steps, dtype=torch.float64)
    else:
        warmup = torch.linspace(warmup_start, base, warmup_steps + 1, dtype=torch.float64)[:-1]
    steps = torch.arange(total_steps - warmup_steps, dtype=torch.float64)
    span = max(total_steps - warmup_steps, 1)
    cosine = final + 0.5 * (base - final) * (1 + torch.cos(math.pi * steps / span))
    return torch.cat([warmup, cosine])


def linear_then_constant(start: float, end: float, ramp_steps: int, total_steps: int) -> torch.Tensor:
    """Linear ramp from ``start`` to ``end`` over ``ramp_steps``, then ``end`` (DINO's teacher
    temperature)."""
    if total_steps <= 0:
        raise ValueError(f"a schedule needs at least one step, got total_steps={total_steps}")
    ramp_steps = min(max(int(ramp_steps), 0), total_steps)
    ramp = torch.linspace(start, end, ramp_steps, dtype=torch.float64) if ramp_steps else torch.empty(0)
    return torch.cat([ramp.double(), torch.full((total_steps - ramp_steps,), end, dtype=torch.float64)])


def at(schedule: torch.Tensor, step: int) -> float:
    """Schedule value at ``step``; past the end (a run extended beyond its plan) it holds the last."""
    return float(schedule[min(step, len(schedule) - 1)])
