"""Where training metrics go: the console and <workdir>/metrics.jsonl always (one JSON line per
log step, plottable without TensorBoard), TensorBoard event files when the `tensorboard` package
imports. Nothing here needs TensorFlow, so GPU images without it log all the same.
"""

from __future__ import annotations

import json
import sys
import time
import types

from absl import logging
from etils import epath

from patch_forcing import paths

# TensorBoard writes event files through its TensorFlow stub when `tensorboard.compat.notf` exists;
# without it, an installed TensorFlow is imported (~3 s per process) only to write scalars.
sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
try:  # optional: event files for TensorBoard (the package writes them without TensorFlow)
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter
except ImportError:  # pragma: no cover - depends on the environment
    EventFileWriter = None


class MetricWriter:
    """write(step, scalars) to the console, metrics.jsonl and TensorBoard; a no-op off the chief."""

    def __init__(self, workdir, enabled: bool = True):
        self.enabled = enabled
        self._jsonl = (epath.Path(workdir) / "metrics.jsonl").open("a") if enabled else None
        self._events = None
        if enabled and EventFileWriter is not None:
            self._events = EventFileWriter(paths.native(workdir))
        elif enabled:
            logging.warning("tensorboard is not installed: no TensorBoard events (metrics.jsonl has them all)")

    def write(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in scalars.items()}
        logging.info("[%d] %s", step, ", ".join(f"{k}={v:.6g}" for k, v in scalars.items()))
        self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
        self._jsonl.flush()
        if self._events is not None:
            values = [summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in scalars.items()]
            self._events.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                                   summary=summary_pb2.Summary(value=values)))

    def flush(self) -> None:
        if self._events is not None:
            self._events.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._events is not None:
            self._events.close()
            self._events = None
