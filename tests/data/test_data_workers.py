"""DataLoader workers ignore the signals their main process answers (:mod:`ssl_vit.data.workers`):
SIGINT and SIGUSR1 always, and what a handler such as ``Preemption`` registers while it is set up,
whatever the workers' start method. The end-to-end runs (signals to a run's process group) are in
tests/training/test_signals.py."""
import signal

import pytest
import torch
from torch.utils.data import Dataset

from ssl_vit.data import ShardDataModule
from ssl_vit.data.stall import WatchedLoader
from ssl_vit.data.workers import (
    IgnoreSignals,
    main_process_signals,
    register_main_process_signals,
    unregister_main_process_signals,
)

WATCHED = (signal.SIGINT, signal.SIGUSR1, signal.SIGTERM, signal.SIGUSR2)


class Dispositions(Dataset):
    """Item ``i``: for each WATCHED signal, whether this (worker) process ignores it."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor([signal.getsignal(s) == signal.SIG_IGN for s in WATCHED])


def ignored_in_worker(context: str) -> dict:
    """What a worker of an ssl_vit DataModule's loader ignores, started with ``context``."""
    kwargs = ShardDataModule("unused-{0..1}.tar", num_workers=1, pin_memory=False)._loader_kwargs()
    loader = WatchedLoader(Dispositions(), **dict(kwargs, batch_size=1), multiprocessing_context=context)
    (flags,) = list(loader)
    return {s.name: bool(f) for s, f in zip(WATCHED, flags[0])}


@pytest.mark.parametrize("context", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])  # spawn: ~15 s
def test_workers_ignore_ctrl_c_slurms_warning_and_what_is_registered(context):
    assert ignored_in_worker(context) == {"SIGINT": True, "SIGUSR1": True, "SIGTERM": False, "SIGUSR2": False}
    register_main_process_signals([signal.SIGTERM])
    try:
        assert ignored_in_worker(context) == {"SIGINT": True, "SIGUSR1": True, "SIGTERM": True, "SIGUSR2": False}
    finally:
        unregister_main_process_signals([signal.SIGTERM])
    assert signal.SIGTERM not in main_process_signals()


def test_registrations_are_counted_and_a_worker_init_fn_keeps_its_set():
    register_main_process_signals([signal.SIGTERM])
    register_main_process_signals([signal.SIGTERM])
    init = IgnoreSignals()
    unregister_main_process_signals([signal.SIGTERM])
    assert signal.SIGTERM in main_process_signals()  # one registration left
    unregister_main_process_signals([signal.SIGTERM])
    assert signal.SIGTERM not in main_process_signals()
    assert signal.SIGTERM in init.signals and "SIGTERM" in repr(init)  # built while registered
