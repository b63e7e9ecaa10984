"""Training batches built ahead of the step that uses them: images are decoded, preprocessed and
tokenized on a background thread while the device runs the current step.

A thread, not `torch.utils.data.DataLoader` worker processes: a batch is built by
`TrainingBatches`, which holds the backend (the model's weights: a worker started by spawn would
receive a copy, one started by fork after CUDA is initialised is unsafe), its fast tokenizer
(disables its own parallelism after a fork) and its processor. Decoding (PIL) and preprocessing
(numpy) release the GIL, and so does the training step's torch work, so one thread overlaps them.
One builder at a time: `TrainingBatches` caches its epoch order and a fast tokenizer may not be
called from two threads at once, so the consumer never builds while the thread lives.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable

import torch

DONE = object()  # what the thread queues after its last batch


class HostSide:
    """`backend` as `TrainingBatches` sees it when the batches it builds stay on the host (CPU
    tensors, `pixel_values` as the processor made them); `Prefetcher` moves them to the model.
    Everything else is the backend's own (a family's method that moves tensors itself still does)."""

    def __init__(self, backend):
        self.backend = backend

    def __getattr__(self, name):
        return getattr(self.backend, name)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def on_model(self, inputs: dict) -> dict:
        return inputs


class Prefetcher:
    """`prefetcher(step)` is `backend.on_model(build(step))`: `build` makes a host batch (built on a
    `HostSide` backend) and the prefetcher moves it to the model's device. From the first step
    asked for, a thread builds that step and the following ones up to `stop` (at most `ahead`
    waiting), pinned when the model is on CUDA so that the copy is asynchronous (`non_blocking`;
    the copy is queued on the consumer's stream, before the step that reads it). A step asked out
    of order stops the thread; it and every later step are then built directly. An error raised in
    `build` is raised again by the call that asks for that step. `close()` ends the thread."""

    def __init__(self, build: Callable[[int], dict], backend, stop: int, ahead: int = 2):
        self.build, self.backend, self.stop, self.ahead = build, backend, stop, ahead
        self.pin = backend.device.type == "cuda"
        self.thread: threading.Thread | None = None
        self.next_step: int | None = None  # the step the thread hands over next; None: build directly
        self.started = False

    def __call__(self, step: int) -> dict:
        if not self.started:
            self._start(step)
        if self.thread is not None and step != self.next_step:
            self.close()
        if self.thread is None:
            return self._to_model(self.build(step))
        item = self.queue.get()
        if item is DONE:  # past `stop`
            self.close()
            return self._to_model(self.build(step))
        self.next_step += 1
        if isinstance(item, BaseException):
            self.close()
            raise item
        return self._to_model(item)

    def _start(self, first: int) -> None:
        self.started = True
        if first >= self.stop:
            return
        self.queue: queue.Queue = queue.Queue(maxsize=self.ahead)
        self.halt = threading.Event()
        self.next_step = first
        self.thread = threading.Thread(target=self._produce, args=(first,), name="batch-prefetch", daemon=True)
        self.thread.start()

    def _produce(self, first: int) -> None:
        for step in range(first, self.stop):
            try:
                item = self._pinned(self.build(step))
            except BaseException as error:  # handed to the consumer, which raises it
                self._put(error)
                return
            if not self._put(item):
                return
        self._put(DONE)

    def _put(self, item) -> bool:
        """Queue `item` unless asked to halt first (the consumer may stop reading at any time)."""
        while not self.halt.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _pinned(self, batch: dict) -> dict:
        if not self.pin:
            return batch
        return {k: v.pin_memory() if isinstance(v, torch.Tensor) and v.device.type == "cpu" else v
                for k, v in batch.items()}

    def _to_model(self, batch: dict) -> dict:
        """The batch where `backend.on_model` puts it (its dtype rule included), copied without
        waiting for the host when pinned."""
        device = self.backend.device
        moved = {k: v.to(device, non_blocking=self.pin) if isinstance(v, torch.Tensor) else v
                 for k, v in batch.items()}
        return self.backend.on_model(moved)

    def close(self) -> None:
        """Stop the thread and wait for it; later steps are built directly."""
        if self.thread is not None:
            self.halt.set()
            self.thread.join()
            self.thread, self.next_step = None, None
