"""Which runner the job's pipelines get."""

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner.fn_runner import FnApiRunner
from apache_beam.testing.util import assert_that, equal_to

from beam_jobs.pipelines import new_pipeline, runs_in_process


def test_the_direct_runner_is_the_in_process_runner_without_a_detour_through_prism():
    for args in ([], ["--runner", "DirectRunner"], ["--runner", "FnApiRunner"]):
        assert isinstance(new_pipeline(PipelineOptions(args)).runner, FnApiRunner), args


def test_the_pipeline_runs_there():
    with new_pipeline(PipelineOptions([])) as pipeline:
        assert_that(pipeline | beam.Create([1, 2]) | beam.Map(lambda x: x * 10), equal_to([10, 20]))


def test_other_runners_are_left_to_beam():
    assert not runs_in_process("FlinkRunner")
    assert not isinstance(new_pipeline(PipelineOptions(["--runner", "PortableRunner"])).runner, FnApiRunner)
