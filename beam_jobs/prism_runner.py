"""The PrismRunner's binary, found in the project's cache without a flag.

Beam's PrismRunner downloads a release binary of Prism unless
``--prism_location`` names one; release downloads cannot be reached here.
``scripts/fetch_prism.sh`` builds Prism at the SDK's own version from the Go
module proxy into ``~/.cache/sensor-scoring/prism/v<version>/prism``, and
:func:`configure` passes that path when no ``--prism_location`` is given.
It is kept out of Beam's own Prism cache on purpose: a binary there would make
every plain DirectRunner pipeline run on Prism (scripts/fetch_prism.sh).
"""

from __future__ import annotations

import os
from typing import Optional

from apache_beam.options.pipeline_options import PipelineOptions, PrismRunnerOptions
from apache_beam.version import __version__ as beam_version


def is_prism(runner: Optional[str]) -> bool:
    """True for Beam's PrismRunner by either of its names."""
    return runner is not None and runner.split(".")[-1] == "PrismRunner"


def prism_binary(version: str = beam_version) -> str:
    """Where scripts/fetch_prism.sh puts Prism for Beam `version` (SENSOR_SCORING_CACHE moves the cache)."""
    cache = os.environ.get("SENSOR_SCORING_CACHE") or os.path.expanduser("~/.cache/sensor-scoring")
    return os.path.join(cache, "prism", f"v{version}", "prism")


def configure(options: PipelineOptions) -> None:
    """Points a PrismRunner without ``--prism_location`` at the fetched binary, when it is there."""
    prism = options.view_as(PrismRunnerOptions)
    if not prism.prism_location and os.path.exists(prism_binary()):
        prism.prism_location = prism_binary()
