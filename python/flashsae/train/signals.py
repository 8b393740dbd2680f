"""Ctrl-C (SIGINT) and SIGTERM during training.

    first signal while training     finish the current step, write a checkpoint, stop (resumable)
    second signal, at any time      abort at once
    a signal before training runs   abort at once (model loading, buffer filling: nothing to save)

:class:`StopSignals` is entered by ``flashsae train`` before anything slow starts (imports aside),
so no Ctrl-C ever meets Python's default handler and its traceback; :meth:`Trainer.train` uses the
active one, or enters its own around the loop when called from Python.

How "at once" is kept for the command line (``abort_process=True``): a Python signal handler runs
only when the main thread returns to the interpreter, which a long kernel (a GEMM, a checkpoint
write) can delay by seconds. So the C-level handler's wakeup byte (``signal.set_wakeup_fd``) is
read by a watcher thread, which prints one line and ends the process with ``os._exit(130)`` while
the main thread is still inside the kernel (torch and flashsae's kernels release the GIL). The last
checkpoint stays intact: checkpoints are replaced atomically (flashsae.storage), so an abort during
a write leaves the previous one. From Python (``abort_process=False``), the second signal raises
KeyboardInterrupt instead, as Python does: a notebook kernel must not be killed.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType
from typing import Any

#: Exit status of an interrupted or aborted run (128 + SIGINT, as shells report Ctrl-C).
EXIT_INTERRUPTED = 130
SIGNALS = (signal.SIGINT, signal.SIGTERM)

_active: StopSignals | None = None


def active() -> StopSignals | None:
    """The StopSignals currently installed (by the CLI or a Trainer), if any."""
    return _active


class StopSignals:
    """Installs the SIGINT / SIGTERM handling described in the module docstring while entered.

    Args:
        abort_process: end the process on an abort (one line on stderr, exit status 130) instead of
            raising KeyboardInterrupt; the command line's choice.
        name: the prefix of the lines it prints (``flashsae train``).
    """

    def __init__(self, *, abort_process: bool, name: str = "flashsae train") -> None:
        self.abort_process = abort_process
        self.name = name
        self.requested = False
        """True once a first signal asked training to stop after the current step."""
        self.training = False
        self.started = False
        self.checkpoint_dir: str | None = None
        self._installed = False
        self._previous: dict[int, Any] = {}
        self._previous_wakeup = -1
        self._pipe: tuple[int, int] | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------ lifecycle

    def __enter__(self) -> StopSignals:
        global _active
        if threading.current_thread() is not threading.main_thread() or _active is not None:
            return self  # signals reach the main thread only; an outer StopSignals already handles them
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        if self.abort_process:
            read_end, write_end = os.pipe()
            os.set_blocking(write_end, False)
            self._pipe = (read_end, write_end)
            self._previous_wakeup = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
            threading.Thread(target=self._watch, args=(read_end,), name="flashsae-signals", daemon=True).start()
        self._installed = True
        _active = self
        return self

    def __exit__(self, *_exc: Any) -> None:
        global _active
        if not self._installed:
            return
        if self._pipe is not None:
            signal.set_wakeup_fd(self._previous_wakeup)
            os.close(self._pipe[1])  # the watcher reads EOF and ends (it closes the read end)
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._installed = False
        _active = None

    def training_started(self, checkpoint_dir: str | os.PathLike | None = None) -> None:
        """Marks the start of the training loop: a first signal from now on stops it gracefully.
        In process mode, prints a line saying so (scripts and tests wait for it)."""
        self.checkpoint_dir = None if checkpoint_dir is None else str(checkpoint_dir)
        self.training = self.started = True
        if self.abort_process:
            print(
                f"{self.name}: training; Ctrl-C stops after the current step and saves a checkpoint "
                "(press it twice to abort at once)",
                flush=True,
            )

    def training_finished(self) -> None:
        """Marks the end of the loop (its last checkpoint written): a signal from now on, during
        evaluation and saving, aborts at once; the checkpoint holds the finished run."""
        self.training = False

    # ------------------------------------------------------------------------------- handling

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.abort_process:
            return  # the watcher thread acts on the wakeup byte of this very signal
        self._on_signal()

    def _watch(self, read_end: int) -> None:
        try:
            while data := os.read(read_end, 64):
                for signum in data:
                    if signum in SIGNALS:
                        self._on_signal()
        finally:
            os.close(read_end)

    def _on_signal(self) -> None:
        with self._lock:
            first_stop = self.training and not self.requested
            if first_stop:
                self.requested = True
        if first_stop:
            print(
                f"{self.name}: stopping after this step and saving a checkpoint (Ctrl-C again to abort)",
                file=sys.stderr,
                flush=True,
            )
            return
        if not self.started:
            self._abort("interrupted before training started; nothing was saved")
        if self.checkpoint_dir is not None and os.path.isdir(self.checkpoint_dir):
            self._abort(f"aborted; the last checkpoint in {self.checkpoint_dir} is kept")
        self._abort("aborted; no checkpoint had been written yet")

    def _abort(self, message: str) -> None:
        if not self.abort_process:
            raise KeyboardInterrupt
        os.write(2, f"{self.name}: {message}\n".encode())
        os._exit(EXIT_INTERRUPTED)
