"""Ctrl-C during `flashsae train`, in a real child process: the first one finishes the step, writes a
checkpoint and exits 130; a second one aborts at once with one line and keeps the last checkpoint; one
before training starts aborts with one line. No traceback in any case.

Robust on a loaded machine: every signal is sent only after the child printed the line that says it
is in the state under test (the trainer prints one when its loop starts; the hooks below print the
others), never after a delay, and the waits are for lines, with generous timeouts that only bound a
hung child."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from flashsae.train.checkpoint import load_training_checkpoint
from train_helpers import text, tiny_bert  # noqa: F401 - text: a fixture the tests request by name

#: Bounds a hung child only (a 2-core machine shared by several test runs takes ~30 s to start one).
WAIT_S = 600
TRAINING = "flashsae train: training; Ctrl-C stops after the current step"

#: The child: flashsae train's main, with hooks that announce (and, when asked, prolong) the phases
#: the tests interrupt: the model loading (Trainer.__init__) and the final checkpoint's write.
CHILD = textwrap.dedent(
    """
    import json, sys, time
    from flashsae.cli import main
    from flashsae.train import signals, trainer

    options = json.loads(sys.argv[1])
    real_init, real_save = trainer.Trainer.__init__, trainer.Trainer.save_checkpoint

    def init(self, config):
        if options["slow_setup"]:
            print("setting up", flush=True)
            time.sleep(600)
        real_init(self, config)

    def save_checkpoint(self):
        real_save(self)
        requested = signals.active().requested
        print(f"checkpoint written at step {self.step}, stop requested: {requested}", flush=True)
        if requested and options["slow_finish"]:
            time.sleep(600)  # what a long final write or evaluation would be: a second Ctrl-C must not wait

    trainer.Trainer.__init__, trainer.Trainer.save_checkpoint = init, save_checkpoint
    sys.exit(main(["train", *options["flags"]]))
    """
)


class Child:
    """A `flashsae train` child process whose stdout lines are read as they come."""

    def __init__(self, flags: list[str], *, slow_setup: bool = False, slow_finish: bool = False) -> None:
        options = {"flags": flags, "slow_setup": slow_setup, "slow_finish": slow_finish}
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(
            [sys.executable, "-c", CHILD, json.dumps(options)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stdout: list[str] = []
        self._stderr: list[str] = []
        # one reader per pipe, and nothing else reads them: communicate() beside a reader thread would
        # race it for stdout's end (a reader that loses never reports the end, and finish() would hang)
        self._readers = [
            threading.Thread(target=self._read, daemon=True),
            threading.Thread(target=lambda: self._stderr.extend(self.process.stderr), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self) -> None:
        try:
            for line in self.process.stdout:
                self.lines.put(line.rstrip("\n"))
        finally:
            self.lines.put(None)

    def wait_for(self, start: str) -> str:
        """The first stdout line starting with `start` (fails if the child ends or hangs first)."""
        while True:
            try:
                line = self.lines.get(timeout=WAIT_S)
            except queue.Empty:
                self.process.kill()
                pytest.fail(f"no line {start!r} within {WAIT_S} s; stdout so far: {self.stdout}")
            if line is None:  # stdout ended: the child exited (or is exiting)
                self._reap()
                pytest.fail(f"the child ended before printing {start!r}; stdout {self.stdout}, stderr {self.stderr}")
            self.stdout.append(line)
            if line.startswith(start):
                return line

    @property
    def stderr(self) -> str:
        return "".join(self._stderr)

    def interrupt(self) -> None:
        self.process.send_signal(signal.SIGINT)

    def _reap(self) -> None:
        """Waits for the child to exit and both readers to finish, then closes the pipes."""
        try:
            self.process.wait(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            pytest.fail(f"the child did not exit within {WAIT_S} s; stdout {self.stdout}")
        for reader in self._readers:
            reader.join(timeout=WAIT_S)
        self.process.stdout.close()
        self.process.stderr.close()

    def finish(self) -> tuple[int, list[str], str]:
        """(exit status, all stdout lines, stderr) once the child has exited."""
        self._reap()
        while (line := self.lines.get(timeout=WAIT_S)) is not None:
            self.stdout.append(line)
        return self.process.returncode, self.stdout, self.stderr


def flags(text: Path, out: Path) -> list[str]:
    # 64-token steps on the tiny BERT; 4096 steps run far longer than any test waits for a line
    return [
        "--model", str(tiny_bert()), "--hookpoints", "encoder.layer.1", "--dataset", str(text),
        "--ctx-len", "16", "--model-batch-size", "4", "--device", "cpu", "--k", "8", "--batch-size", "64",
        "--buffer-tokens", "256", "--eval-tokens", "128", "--no-progress", "--no-tensorboard", "--out", str(out),
        "--train-tokens", "256k", "--checkpoint-every", "0",
    ]  # fmt: skip


def test_first_ctrl_c_finishes_the_step_saves_and_exits_130(tmp_path, text):
    run = tmp_path / "run"
    child = Child(flags(text, run))
    child.wait_for(TRAINING)
    child.interrupt()
    status, stdout, stderr = child.finish()
    assert status == 130, (stdout, stderr)
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert "stopping after this step and saving a checkpoint" in stderr
    stopped = next(line for line in stdout if line.startswith("interrupted at step "))
    step = int(stopped.split()[3].rstrip(";"))
    assert f"flashsae train --out {run} --resume" in stopped
    state, _ = load_training_checkpoint(run / "checkpoint")  # verified against its sha256
    assert state["step"] == step  # (0 only if the signal beat the first step)
    assert json.loads((run / "summary.json").read_text())["interrupted"] is True


def test_second_ctrl_c_aborts_at_once_with_one_line_and_keeps_the_checkpoint(tmp_path, text):
    run = tmp_path / "run"
    child = Child(flags(text, run), slow_finish=True)
    child.wait_for(TRAINING)
    child.interrupt()
    written = child.wait_for("checkpoint written at step ")
    assert written.endswith("stop requested: True")
    step = int(written.split()[4].rstrip(","))
    child.interrupt()  # the child now sleeps for 600 s after its checkpoint: only an abort ends it early
    status, stdout, stderr = child.finish()
    assert status == 130, (stdout, stderr)
    lines = stderr.strip().splitlines()
    assert lines[-1] == f"flashsae train: aborted; the last checkpoint in {run / 'checkpoint'} is kept", stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert lines[:-1] == ["flashsae train: stopping after this step and saving a checkpoint (Ctrl-C again to abort)"]
    state, _ = load_training_checkpoint(run / "checkpoint")
    assert state["step"] == step


def test_ctrl_c_before_training_starts_aborts_with_one_line(tmp_path, text):
    run = tmp_path / "run"
    child = Child(flags(text, run), slow_setup=True)
    child.wait_for("setting up")
    child.interrupt()
    status, stdout, stderr = child.finish()
    assert status == 130, (stdout, stderr)
    assert stderr.strip() == "flashsae train: interrupted before training started; nothing was saved", stderr
    assert not (run / "checkpoint").exists()
