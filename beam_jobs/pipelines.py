"""The Beam pipeline every entry point runs; on the DirectRunner, straight on the in-process runner.

Beam's DirectRunner first tries Prism, a runner binary it downloads from
GitHub on every start, and falls back to the in-process FnApiRunner when
that fails. Without network (this machine) each job process spent about
0.2 s on the attempt and kept the worker pool Beam started for it; with
network the job would run on Prism instead of the runner its timer and
state behaviour was measured and tested on (README, Design). So the job's
pipelines, which the FnApiRunner supports (no processing-time timers, no
TestStream), go to it directly, set up as the DirectRunner sets it up:
with the pipeline options in its provision info, for multi-process workers.
Any other ``--runner`` is Beam's to create, Flink and Prism with their
job server found in the project's caches (beam_jobs/flink_runner.py,
beam_jobs/prism_runner.py). :func:`run_to_end` runs a
pipeline with the long-lived objects kept out of the GC (beam_jobs/heap.py).
"""

from __future__ import annotations

from typing import Optional

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from beam_jobs import flink_runner, prism_runner
from beam_jobs.heap import long_lived_objects_frozen
from transforms.state_cache import no_state_cache_in_process

IN_PROCESS_RUNNERS = ("DirectRunner", "direct", "FnApiRunner")


def runs_in_process(runner: Optional[str]) -> bool:
    """True for the DirectRunner (the default) and the FnApiRunner by any of their names."""
    return runner is None or runner.split(".")[-1] in IN_PROCESS_RUNNERS


def in_process_streaming(options: PipelineOptions) -> bool:
    """Whether the job takes the in-process runner's streaming workarounds (transforms/in_process_runner.py).

    The one place that decides it: a streaming pipeline on the in-process
    runner. Bounded runs there, and every other runner, keep Beam's
    semantics and take the plain path.
    """
    standard = options.view_as(StandardOptions)
    return bool(standard.streaming) and runs_in_process(standard.runner)


def reorders_keyed_input(options: PipelineOptions) -> bool:
    """Whether a stateful DoFn may see a key's elements out of the order they were sent in.

    Flink in batch does (its grouping sorts by key only), so there the
    device state gets each device's events sorted by read position
    (transforms/read_order.py). Streaming runners and the in-process runner
    keep the order.
    """
    standard = options.view_as(StandardOptions)
    return not standard.streaming and flink_runner.is_flink(standard.runner)


def calls_bundle_finalizers(options: PipelineOptions) -> bool:
    """Whether the runner calls bundle finalizers, which the commit step registers its commits with.

    Flink never does in batch (apache/beam #19525, #19526): the registration
    itself fails the job there. A bounded job on Flink therefore commits its
    end offsets once it has ended successfully (sensor_scoring.run).
    """
    standard = options.view_as(StandardOptions)
    return bool(standard.streaming) or not flink_runner.is_flink(standard.runner)


def new_pipeline(options: PipelineOptions) -> beam.Pipeline:
    """A pipeline for `options`, on the FnApiRunner without a state cache when it runs in this process."""
    runner = options.view_as(StandardOptions).runner
    if flink_runner.is_flink(runner):
        flink_runner.configure(options)
    elif prism_runner.is_prism(runner):
        prism_runner.configure(options)
    if not runs_in_process(runner):
        return beam.Pipeline(options=options)
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle

    no_state_cache_in_process()
    encoded_options = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    provision_info = fn_runner.ExtendedProvisionInfo(
        beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded_options))
    return beam.Pipeline(runner=fn_runner.FnApiRunner(provision_info=provision_info), options=options)


def run_to_end(pipeline: beam.Pipeline) -> beam.runners.runner.PipelineResult:
    """Runs `pipeline` until it ends (bounded) or is stopped, the loaded modules and models frozen out of the GC."""
    with long_lived_objects_frozen():
        result = pipeline.run()
        result.wait_until_finish()
    return result
