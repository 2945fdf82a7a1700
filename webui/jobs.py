"""The one queue in front of the served model: every generation, whichever door it came through.

The page and ``gradio_client`` arrive through Gradio's queue (one event at a time on the model);
the web UI's REST API (``sdapi.py``) arrives through FastAPI beside it. Both end here: work on
the model runs only while it holds its turn, turns are given in arrival order, and the running
job's progress (step, total, the latest x̂0 prediction) is what ``/sdapi/v1/progress`` reports
and what ``/sdapi/v1/interrupt`` stops.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from stable_diffusion.pipelines import CancelToken, GenerationCancelled, StableDiffusion
from stable_diffusion.samplers import StepCallback

__all__ = ["GenerationQueue", "Job"]

logger = logging.getLogger(__name__)

# How often a request waiting for its turn looks at its cancel token (the user pressed Stop, or
# the HTTP client went away): it then leaves the line instead of running for nobody.
_POLL_S = 0.25


@dataclass
class Job:
    """The work holding the model now, as the web UI's progress reports it.

    A job runs ``parts`` generations one after the other (the API's ``n_iter``); ``part`` is the
    running one, ``step`` of ``steps`` its sampler's progress.
    """

    name: str
    door: str = ""  # who asked: "page", "api", "warm-up", ...
    parts: int = 1
    part: int = 0
    step: int = 0
    steps: int = 0
    pipe: StableDiffusion | None = None
    x0_latents: torch.Tensor | None = None  # the latest prediction of the clean latents, for a preview
    interrupted: threading.Event = field(default_factory=threading.Event)
    started: float = field(default_factory=time.monotonic)
    timestamp: str = field(default_factory=lambda: time.strftime("%Y%m%d%H%M%S"))

    @property
    def progress(self) -> float:
        """The fraction done, over all parts."""
        done = self.part + (self.step / self.steps if self.steps else 0.0)
        return min(1.0, done / self.parts)

    @property
    def eta_s(self) -> float:
        """Seconds left, extrapolated from the time taken so far (0 until the first step)."""
        progress = self.progress
        elapsed = time.monotonic() - self.started
        return elapsed * (1.0 - progress) / progress if progress > 0 else 0.0

    def observe(self, callback: StepCallback | None) -> StepCallback:
        """The sampler's callback: record the step, then call ``callback``."""

        def on_step(step: int, total: int, x0_latents: torch.Tensor) -> None:
            self.step, self.steps, self.x0_latents = step + 1, total, x0_latents
            if callback is not None:
                callback(step, total, x0_latents)

        return on_step

    def stop_when(self, cancel: CancelToken | None) -> CancelToken:
        """A cancel token set by the caller's ``cancel`` or by an interrupt of this job."""
        return _Either(self.interrupted, cancel)


@dataclass(frozen=True)
class _Either:
    first: CancelToken
    second: CancelToken | None

    def is_set(self) -> bool:
        return self.first.is_set() or (self.second is not None and self.second.is_set())


class GenerationQueue:
    """A first-come, first-served lock on the model that knows what it is running."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._waiting: deque[object] = deque()
        self._running: Job | None = None

    @property
    def waiting(self) -> int:
        """How many are waiting for their turn."""
        return len(self._waiting)

    @property
    def running(self) -> Job | None:
        return self._running

    @contextmanager
    def turn(self, name: str, *, door: str, parts: int = 1, cancel: CancelToken | None = None) -> Iterator[Job]:
        """Wait for the model, in arrival order, and hold it until the block ends.

        ``door``: who asked ("page", "api"), for the log. A set ``cancel`` gives up the place in
        line (``GenerationCancelled``). The start and end of each job are logged while the lock
        is held, so the log shows them strictly alternating.
        """
        ticket = object()
        with self._condition:
            self._waiting.append(ticket)
            try:
                while self._running is not None or self._waiting[0] is not ticket:
                    if cancel is not None and cancel.is_set():
                        raise GenerationCancelled(f"{name} cancelled while waiting for its turn")
                    self._condition.wait(timeout=_POLL_S)
            finally:
                self._waiting.remove(ticket)
                self._condition.notify_all()
            job = self._running = Job(name, door=door, parts=parts)
            logger.info("Job started: %s via %s", name, door)
        try:
            yield job
        finally:
            with self._condition:
                logger.info("Job finished: %s via %s in %.2f s", name, door, time.monotonic() - job.started)
                self._running = None
                self._condition.notify_all()

    def interrupt(self) -> bool:
        """Stop the running job at its next step; False when nothing runs."""
        job = self._running
        if job is None:
            return False
        job.interrupted.set()
        return True
