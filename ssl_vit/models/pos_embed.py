"""Fixed 2-D sine-cosine position embeddings (MAE, Sec. A.1 of He et al.)."""
from typing import Tuple

import torch


def sincos_2d(dim: int, grid_size: Tuple[int, int], num_prefix_tokens: int = 0) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding, laid out as the MAE reference code lays it out.

    The first half of the channels encodes the column (x) coordinate, the second half the row (y);
    each half is ``[sin(pos * omega), cos(pos * omega)]`` with ``omega = 1 / 10000 ** (k / (dim / 4))``.
    Prefix tokens (CLS, registers) get zeros.

    Args:
        dim: embedding width, divisible by 4.
        grid_size: patch grid ``(rows, cols)``.
        num_prefix_tokens: number of zero rows prepended.

    Returns:
        ``[1, num_prefix_tokens + rows * cols, dim]`` float32 tensor.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    rows, cols = grid_size
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # [D/4]
    y, x = torch.meshgrid(
        torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64), indexing="ij"
    )

    def encode(pos: torch.Tensor) -> torch.Tensor:  # [N] -> [N, D/2]
        angles = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    emb = torch.cat([encode(x), encode(y)], dim=1)  # [rows * cols, D]
    emb = torch.cat([torch.zeros(num_prefix_tokens, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float().unsqueeze(0)
