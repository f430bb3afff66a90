"""Which runner the job's pipelines get."""

import os

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


def test_flink_and_prism_get_the_fetched_job_server_unless_one_is_named(tmp_path):
    from apache_beam.options.pipeline_options import FlinkRunnerOptions, PrismRunnerOptions

    from beam_jobs.flink_runner import FETCHED_BEAM_VERSION, FETCHED_FLINK_VERSION, job_server_jar
    from beam_jobs.prism_runner import prism_binary

    flink = PipelineOptions(["--runner", "FlinkRunner", "--jar_cache_dir", str(tmp_path)])
    new_pipeline(flink)
    assert flink.view_as(FlinkRunnerOptions).flink_job_server_jar is None  # nothing fetched into that cache
    fetched = job_server_jar(FETCHED_FLINK_VERSION, FETCHED_BEAM_VERSION, str(tmp_path))
    open(fetched, "w").close()
    new_pipeline(flink)
    assert flink.view_as(FlinkRunnerOptions).flink_job_server_jar == fetched
    assert flink.view_as(FlinkRunnerOptions).flink_version == FETCHED_FLINK_VERSION
    named = PipelineOptions(["--runner", "FlinkRunner", "--jar_cache_dir", str(tmp_path),
                             "--flink_job_server_jar", "/opt/job-server.jar"])
    new_pipeline(named)
    assert named.view_as(FlinkRunnerOptions).flink_job_server_jar == "/opt/job-server.jar"

    prism = PipelineOptions(["--runner", "PrismRunner"])
    new_pipeline(prism)
    expected = prism_binary() if os.path.exists(prism_binary()) else None
    assert prism.view_as(PrismRunnerOptions).prism_location == expected
