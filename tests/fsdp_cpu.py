"""``ViTFSDP`` on CPU processes (gloo), for the tests (``PYTHONPATH=tests``).

Lightning's ``FSDPStrategy`` passes ``device_id=root_device.index`` to torch's
``FullyShardedDataParallel``: ``None`` on CPU, which torch refuses ("FSDP needs a non-CPU accelerator
device"). This subclass wraps the model exactly as ``FSDPStrategy._setup_model`` does but with
``device_id=torch.device("cpu")``; everything else (wrap and checkpointing policies, the optimiser
set-up, checkpoints) is ``ssl_vit.training.strategies.ViTFSDP`` unchanged.
"""
import torch
from lightning_fabric.strategies.fsdp import _setup_activation_checkpointing
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel

from ssl_vit.training.strategies import ViTFSDP


class CPUViTFSDP(ViTFSDP):
    def _setup_model(self, model: nn.Module) -> nn.Module:
        model = FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model
