"""The DINO loss: cross-entropy between a centred, sharpened teacher and a softer student.

Caron et al. 2021, Eq. (3)-(4) and Algorithm 1. Every schedule value (teacher temperature) is an
argument of ``forward``; the only state is the centre, a buffer that is saved and restored with the
module. Also the teacher-side collapse indicators (``teacher_stats``).
"""
from typing import Callable, Dict

import torch
from torch import Tensor, nn
from torch.nn import functional as F

Reduce = Callable[[Tensor], Tensor]


def _identity(t: Tensor) -> Tensor:
    return t


class DINOLoss(nn.Module):
    """Cross-entropy ``H(P_t(x_g), P_s(x_v))`` over every pair (teacher global view ``g``, student
    view ``v``) with ``g != v``, averaged over the number of pairs and over the batch::

        P_t = softmax((t - c) / teacher_temp)      P_s = softmax(s / student_temp)
        loss = 1 / n_pairs * sum_{g < G} sum_{v < V, v != g} mean_b sum_k -P_t[g,b,k] log P_s[v,b,k]

    The teacher's views are the student's first ``G`` views (the global crops), so pairs ``v == g``
    (a view with itself) are skipped; ``n_pairs = G * V - G``.

    After the loss is computed (with the old centre), the centre moves towards the mean teacher
    output, averaged over all processes by ``center_reduce``::

        c <- m * c + (1 - m) * center_reduce(mean_b t)

    With equal per-process batches this equals the reference's ``all_reduce(sum) / (B * world)``.

    Args:
        out_dim: number of prototypes ``K``.
        center_momentum: ``m`` above.
    """

    def __init__(self, out_dim: int, center_momentum: float = 0.9) -> None:
        super().__init__()
        if out_dim < 1:
            raise ValueError(f"DINOLoss: out_dim must be >= 1, got {out_dim}")
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"DINOLoss: center_momentum must be in [0, 1], got {center_momentum}")
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))  # [1, K]

    def forward(
        self,
        student_output: Tensor,
        teacher_output: Tensor,
        num_student_views: int,
        teacher_temp: float,
        student_temp: float = 0.1,
        update_center: bool = True,
        center_reduce: Reduce = _identity,
    ) -> Tensor:
        """Args:
            student_output: ``[V * B, K]`` logits, crop-major (``MultiCropNet`` order).
            teacher_output: ``[G * B, K]`` logits of the first ``G`` (global) views.
            num_student_views: ``V``.
            teacher_temp: teacher softmax temperature (schedule value of this step).
            student_temp: student softmax temperature.
            update_center: update the centre after computing the loss.
            center_reduce: averages a tensor over all processes (identity on one process); a
                LightningModule passes ``lambda t: self.trainer.strategy.reduce(t, reduce_op="mean")``.

        Returns:
            scalar loss, computed outside autocast in float32 (or float64 for float64 inputs).
        """
        if teacher_temp <= 0 or student_temp <= 0:
            raise ValueError(f"temperatures must be > 0, got teacher {teacher_temp}, student {student_temp}")
        num_views, k = num_student_views, self.center.shape[1]
        if student_output.ndim != 2 or student_output.shape[1] != k or student_output.shape[0] % num_views:
            raise ValueError(f"student_output must be [{num_views} * B, {k}], got {tuple(student_output.shape)}")
        batch = student_output.shape[0] // num_views
        if teacher_output.ndim != 2 or teacher_output.shape[1] != k or teacher_output.shape[0] % batch:
            raise ValueError(f"teacher_output must be [G * {batch}, {k}], got {tuple(teacher_output.shape)}")
        num_global = teacher_output.shape[0] // batch
        if not 1 <= num_global <= num_views or num_views < 2:
            raise ValueError(f"need 1 <= teacher views ({num_global}) <= student views ({num_views}) and >= 2 views")

        dtype = torch.promote_types(student_output.dtype, torch.float32)  # bf16/fp16 -> fp32
        with torch.autocast(device_type=student_output.device.type, enabled=False):
            teacher_output = teacher_output.detach().to(dtype)
            log_p_s = F.log_softmax(student_output.to(dtype) / student_temp, dim=-1)  # [V*B, K]
            p_t = F.softmax((teacher_output - self.center.to(dtype)) / teacher_temp, dim=-1)  # [G*B, K]
            # cross[g, v] = sum_b sum_k -p_t[g, b, k] * log_p_s[v, b, k]: one [G, B*K] @ [B*K, V] matmul
            cross = -p_t.reshape(num_global, batch * k) @ log_p_s.reshape(num_views, batch * k).T  # [G, V]
            same_view = torch.eye(num_global, num_views, dtype=torch.bool, device=cross.device)
            loss = cross.masked_fill(same_view, 0.0).sum() / (batch * (num_global * num_views - num_global))
            if update_center:
                self.update_center(teacher_output, center_reduce)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_output: Tensor, center_reduce: Reduce = _identity) -> None:
        """``c <- m c + (1 - m) reduce(mean_b t)``, in place, without a host sync.

        Args:
            teacher_output: ``[N, K]`` teacher logits of this process.
            center_reduce: mean over processes (see ``forward``).
        """
        batch_center = center_reduce(teacher_output.to(self.center.dtype).mean(dim=0, keepdim=True))  # [1, K]
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1.0 - self.center_momentum)


@torch.no_grad()
def teacher_stats(teacher_output: Tensor, center: Tensor, teacher_temp: float) -> Dict[str, Tensor]:
    """Collapse indicators of the teacher's centred, sharpened distribution ``q_i = softmax((t_i - c) / T)``.

    * ``entropy``: ``mean_i H(q_i) = mean_i -sum_k q_ik log q_ik``, in nats, in ``[0, log K]``.
      Near 0: every sample is sent to one prototype (collapse by domination, too little centring);
      near ``log K``: uniform outputs (collapse by uniformity, too little sharpening).
    * ``kl_to_centre``: ``mean_i KL(q_i || q_bar)``, where the centre distribution ``q_bar = mean_i q_i``
      is the batch mean of the teacher distributions (the distribution centring flattens). It is the
      mutual information between a sample and its prototype, ``H(q_bar) - mean_i H(q_i)``, in
      ``[0, log min(N, K)]``, and is 0 exactly when all teacher outputs are equal, i.e. under either
      collapse.

    Args:
        teacher_output: ``[N, K]`` teacher logits (rows of this process only; no sync).
        center: ``[1, K]`` the centre used for this step's loss.
        teacher_temp: teacher temperature of this step.

    Returns:
        ``{"entropy": scalar, "kl_to_centre": scalar}`` float32 tensors on the logits' device.
    """
    with torch.autocast(device_type=teacher_output.device.type, enabled=False):
        log_q = F.log_softmax((teacher_output.float() - center) / teacher_temp, dim=-1)  # [N, K]
        q = log_q.exp()
        entropy = -(q * log_q).sum(-1).mean()
        log_q_bar = q.mean(0, keepdim=True).clamp_min(torch.finfo(q.dtype).tiny).log()  # [1, K]
        kl = (q * (log_q - log_q_bar)).sum(-1).mean().clamp_min(0.0)
    return {"entropy": entropy, "kl_to_centre": kl}

