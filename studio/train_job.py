"""One DreamBooth training at a time for the web UI, run as `python -m studio.train_dreambooth` in a child
process so a crash or a cancel never takes the app (or its loaded model) down.

Progress (step, loss, steps/s, time left) is read from the trainer's tqdm bar on stderr; validation
images are the PNGs it writes into `OUTPUT/validation/`. When the trainer exits cleanly, `on_finished`
gets the LoRA file (the UI copies it into the library).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from studio.errors import StudioError

LORA_FILE = "pytorch_lora_weights.safetensors"  # what the trainer writes into its output folder
PROJECT_ROOT = Path(__file__).resolve().parent.parent
# tqdm's bar: "steps:  40%|####      | 4/10 [00:01<00:02,  2.50it/s, loss=0.1234, lr=1.00e-04]"
TQDM_BAR = re.compile(
    r"(?P<step>\d+)/(?P<total>\d+) \[(?P<elapsed>[\d:]+)<(?P<eta>[\d:?]+),\s*(?P<rate>[\d.?]+)(?P<unit>it/s|s/it)"
    r"(?:,\s*loss=(?P<loss>[^,\]]+))?"
)
LOG_LINES = 40
CANCEL_GRACE_SECONDS = 10


@dataclass
class TrainStatus:
    """What a page shows about the current (or last) training."""

    state: str = "idle"  # idle | starting | running | finished | failed | cancelled
    name: str | None = None
    step: int = 0
    total: int = 0
    loss: float | None = None
    steps_per_second: float | None = None
    eta: str | None = None
    elapsed_seconds: float = 0.0
    message: str = ""
    log: list[str] = field(default_factory=list)
    lora: Path | None = None
    validation_images: list[Path] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.state in ("starting", "running")


class TrainingJob:
    """Starts, watches and cancels the trainer process; refuses a second start while one runs."""

    def __init__(self, on_finished: Callable[[str, Path], str]):
        """`on_finished(name, lora_path)` runs when a training succeeds; its return is shown as the message."""
        self.on_finished = on_finished
        self._status = TrainStatus()
        self._process: subprocess.Popen | None = None
        self._output_dir: Path | None = None
        self._started_at = 0.0
        self._cancelled = False
        self._done = threading.Event()
        self._done.set()
        self._lock = threading.Lock()

    def start(self, name: str, output_dir: Path, trainer_args: list[str]) -> None:
        """Run `python -m studio.train_dreambooth TRAINER_ARGS...` (which name `output_dir` as --output-dir)
        in the background."""
        with self._lock:
            if self._status.active:
                raise StudioError(
                    f"a training ({self._status.name}) is already running; wait for it to finish or cancel it first"
                )
            command = [sys.executable, "-m", "studio.train_dreambooth", *trainer_args]
            environment = dict(os.environ, PYTHONUNBUFFERED="1")
            environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=environment,
                cwd=PROJECT_ROOT,
                start_new_session=True,  # its own process group, so cancel also stops any data-loader workers
            )
            self._output_dir = Path(output_dir)
            self._started_at = time.monotonic()
            self._cancelled = False
            self._done.clear()
            self._status = TrainStatus(state="starting", name=name, message="loading the base model...")
            threading.Thread(target=self._watch, args=(self._process, name), daemon=True).start()

    def cancel(self) -> None:
        """Stop the running training (SIGTERM to its process group, SIGKILL after a grace period)."""
        with self._lock:
            process = self._process
            if process is None or not self._status.active:
                raise StudioError("no training is running")
            self._cancelled = True
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=CANCEL_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> TrainStatus:
        """Block until the current training has ended and been handed to `on_finished` (for scripts, tests)."""
        self._done.wait(timeout)
        return self.status()

    def status(self) -> TrainStatus:
        with self._lock:
            status = self._status
            if status.active:
                status.elapsed_seconds = time.monotonic() - self._started_at
            if self._output_dir is not None:
                status.validation_images = sorted((self._output_dir / "validation").glob("*.png"))
            return TrainStatus(**{**status.__dict__, "log": list(status.log)})

    # Internals -----------------------------------------------------------------------------------------

    def _watch(self, process: subprocess.Popen, name: str) -> None:
        """Read the trainer's output until it exits; tqdm redraws its bar with '\\r', log lines end in '\\n'."""
        log: deque[str] = deque(maxlen=LOG_LINES)
        pending = ""
        for chunk in iter(lambda: os.read(process.stdout.fileno(), 4096), b""):
            pending += chunk.decode("utf-8", errors="replace")
            *pieces, pending = re.split(r"[\r\n]", pending)
            for piece in filter(None, (p.strip() for p in pieces)):
                self._take_line(piece, log)
        if pending.strip():
            self._take_line(pending.strip(), log)
        process.wait()
        process.stdout.close()
        self._finish(process.returncode, name, log)

    def _take_line(self, line: str, log: deque[str]) -> None:
        bar = TQDM_BAR.search(line)
        with self._lock:
            if bar is None:
                log.append(line)
                self._status.log = list(log)
                return
            status = self._status
            status.state = "running"
            status.step, status.total = int(bar["step"]), int(bar["total"])
            status.eta = bar["eta"] if "?" not in bar["eta"] else None
            if "?" not in bar["rate"]:
                rate = float(bar["rate"])
                status.steps_per_second = rate if bar["unit"] == "it/s" else (1.0 / rate if rate else None)
            if bar["loss"]:
                try:
                    status.loss = float(bar["loss"])
                except ValueError:
                    pass
            status.message = "training"

    def _finish(self, returncode: int, name: str, log: deque[str]) -> None:
        lora = self._output_dir / LORA_FILE if self._output_dir is not None else None
        if self._cancelled:
            state, message = "cancelled", "cancelled; nothing was added to the library"
        elif returncode == 0 and lora is not None and lora.is_file():
            try:
                state, message = "finished", self.on_finished(name, lora)
            except StudioError as error:
                state, message = "failed", f"trained, but could not add it to the library: {error}"
        else:
            errors = [line for line in log if line.startswith("error:")]
            state = "failed"
            message = (
                errors[-1]
                if errors
                else f"the trainer stopped with exit code {returncode}: {log[-1] if log else 'no output'}"
            )
        with self._lock:
            self._status.state = state
            self._status.message = message
            self._status.lora = lora if state == "finished" else None
            self._status.elapsed_seconds = time.monotonic() - self._started_at
            self._status.log = list(log)
        self._done.set()
