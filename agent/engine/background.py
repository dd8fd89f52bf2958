"""Work the engine process does beside scoring: loading a candidate model, building a frame engine."""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger(__name__)


def lower_thread_priority(work: str) -> None:
    """Nice the calling thread to 19 (Linux: per thread), so `work` never takes the CPU from scoring.

    Threads it creates afterwards (ONNX Runtime's, TensorRT's builder's) inherit the nice value.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (OSError, AttributeError) as error:
        log.debug("could not lower the priority of %s: %s", work, error)
