"""The Beam SDK worker's user-state cache: cheaper weighing, and off in the job's in-process runner.

**Weighing.** The SDK harness caches user state as Python objects and
weighs each value it puts into the cache with ``objsize.get_deep_size``. By
default objsize first collects the globals of every module in
``sys.modules`` into its exclusion set, on every call: with torch, scipy and
Beam loaded (about 2,800 modules) that is about 0.55 ms per call, and a
ReadModifyWriteState write makes two calls (the clear and the new value),
so it cost about 1.1 ms per event, more than everything else per event
together (see the README, Performance).

Beam's own filter already skips modules, types and functions, the only ways
from a state value to a module's globals, so leaving the scan out weighs
the values the job keeps in state (device states, offsets, drift windows)
exactly as before: the measured sizes are unchanged, at 4 to 20 µs a call.

**Off in the in-process runner.** Even so, weighing a device's state walks
its object graph (about 35 µs for a calibrated device, 100 µs with a full
calibration buffer), once per device and bundle, and the cache saves only
the decode of the next bundle's read (about 10 µs; the in-process runner
hands every bundle the same cache token, so entries do hit). In streaming,
bundles are small, so that was about 35 ms of each bundle of 1,000 devices,
and the cache holds up to 100 MB of decoded states besides the encoded
ones the runner keeps. SDK workers started by a runner (Flink, the
portable runner, the multi-process DirectRunner) already have the cache off
unless ``--max_cache_memory_usage_mb`` asks for one; the in-process
FnApiRunner hard-codes 100 MB (``worker_handlers.STATE_CACHE_SIZE_MB``).
:func:`no_state_cache_in_process` sets that to 0 before the job runs.
Without a cache a bundle reads each key's state once from the runner and
decodes it; later reads in the bundle see the written value.
"""

from __future__ import annotations

import logging

import objsize

_LOG = logging.getLogger(__name__)


def skip_module_globals_scan() -> None:
    """Turns the per-call scan off in this process (idempotent); called from the stateful DoFns' setup()."""
    objsize.default_settings.update(exclude_modules_globals=False)


def no_state_cache_in_process() -> None:
    """Runs the in-process FnApiRunner's SDK worker without a user-state cache, like Beam's other workers."""
    try:
        from apache_beam.runners.portability.fn_api_runner import worker_handlers
    except ImportError:  # pragma: no cover - a Beam without the in-process runner
        return
    if hasattr(worker_handlers, "STATE_CACHE_SIZE_MB"):
        worker_handlers.STATE_CACHE_SIZE_MB = 0
    else:  # pragma: no cover - the constant moved in another Beam version
        _LOG.warning("apache_beam has no worker_handlers.STATE_CACHE_SIZE_MB: the in-process state cache stays on")
