"""DataLoader workers that outlive the signals their main process answers.

SLURM signals every process of a job step (its warning before the time limit, ``scancel``, the
SIGTERM that ends a job) and a terminal's Ctrl-C reaches the whole foreground process group: the
DataLoader workers get the signal as well as the main process. The main process answers it with an
orderly stop (``ssl_vit.training.Preemption`` saves ``last.ckpt`` at the next step boundary;
Lightning turns Ctrl-C into its ``KeyboardInterrupt`` shutdown) and then shuts its workers down
itself. A worker that died of the signal first (SIGTERM, SIGUSR1: the default action ends the
process; torch's own SIGTERM handler in workers re-raises it) or left on a ``KeyboardInterrupt``
(SIGINT) takes the run down instead: the main process stops with ``DataLoader worker ... killed by
signal`` or ``... exited unexpectedly`` before the step boundary, and nothing is saved.

This module is the one place that knows which signals the main process answers:

* SIGINT and SIGUSR1 always: Ctrl-C, which Lightning (or ``Preemption``) answers in every run, and
  SLURM's warning (``#SBATCH --signal=SIGUSR1@90``), which Lightning's SLURM requeue handler or
  ``Preemption`` answers;
* whatever a handler registers while it is installed (:func:`register_main_process_signals`, undone
  by :func:`unregister_main_process_signals`): ``Preemption`` registers the signals it is configured
  with (SIGTERM, ...) from its ``setup`` to its ``teardown``.

:class:`IgnoreSignals` (the ssl_vit DataModules' ``worker_init_fn``) makes a worker ignore them. It
carries the set it was built with, so it works whatever the start method (``fork``, ``spawn``,
``forkserver``); a DataLoader built while ``Preemption`` is set up (its ``setup`` runs before
Lightning asks for the loaders) gets Preemption's signals.

A worker that ignores SIGTERM can no longer be ended by torch's last resort (``terminate()`` after a
worker did not exit within 5 s of being told to): a worker stuck in a read is ended by the read
timeout (:mod:`ssl_vit.data.stall`), and SIGKILL ends any process.
"""
import signal
from collections import Counter
from typing import Iterable, Optional, Tuple

ALWAYS_ANSWERED = tuple(getattr(signal, name) for name in ("SIGINT", "SIGUSR1") if hasattr(signal, name))

_registered: Counter = Counter()  # signal -> handlers that answer it in this process now


def register_main_process_signals(signals: Iterable[int]) -> None:
    """From now on, DataLoader workers built in this process ignore ``signals`` (a handler in the
    main process answers them)."""
    _registered.update(int(s) for s in signals)


def unregister_main_process_signals(signals: Iterable[int]) -> None:
    """Undo one :func:`register_main_process_signals` of ``signals`` (the handler is gone)."""
    _registered.subtract(int(s) for s in signals)


def main_process_signals() -> Tuple[int, ...]:
    """The signals the main process answers now (see the module docstring), sorted."""
    return tuple(sorted(set(ALWAYS_ANSWERED) | {s for s, count in _registered.items() if count > 0}))


class IgnoreSignals:
    """A ``worker_init_fn``: the worker ignores ``signals``. Picklable, for ``spawn``/``forkserver``
    workers.

    Args:
        signals: signal numbers; default: :func:`main_process_signals` now (build it in the main
            process, when the loader is built).
    """

    def __init__(self, signals: Optional[Iterable[int]] = None) -> None:
        self.signals = main_process_signals() if signals is None else tuple(int(s) for s in signals)

    def __call__(self, worker_id: int) -> None:
        for number in self.signals:
            signal.signal(number, signal.SIG_IGN)

    def __repr__(self) -> str:
        return f"IgnoreSignals({[signal.Signals(s).name for s in self.signals]})"
