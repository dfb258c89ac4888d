"""The KoLeo regulariser (Sablayrolles et al. 2019, "Spreading vectors for similarity search"; used by
DINOv2 on the student's CLS tokens): the Kozachenko-Leonenko differential-entropy estimator, as a loss.

For L2-normalised rows ``x_i``, ``-mean_i log min_{j != i} ||x_i - x_j||``: it pushes every row away from its
nearest neighbour, so that the rows spread over the sphere instead of gathering in one direction.
"""
import torch
import torch.nn.functional as F
from torch import Tensor


def koleo_loss(x: Tensor, eps: float = 1e-8) -> Tensor:
    """KoLeo loss of the rows of ``x`` ``[N, D]`` (N >= 2), normalised in float32; a scalar."""
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"koleo_loss needs [N, D] with N >= 2 rows, got shape {tuple(x.shape)}")
    x = F.normalize(x.float(), dim=-1)
    dist = torch.cdist(x, x)  # [N, N]
    self_pairs = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    nearest = dist.masked_fill(self_pairs, float("inf")).min(dim=1).values  # [N]
    return -torch.log(nearest + eps).mean()
