"""Which model scores which device, and switching to a new artifact without a restart.

Roles:

* primary (``--model_dir``) decides for every device outside the canary;
* canary (``--canary_model_dir``) decides for ``--canary_percent`` % of the
  devices, chosen by a stable hash of device_id, so a device stays on one
  side for the whole rollout and its state stays coherent;
* shadow (``--shadow_model_dir``) scores every event as well, to its own
  topic; its scores never decide anything.

Hot swap: each model folder is checked again at most every ``poll_s`` seconds,
as events arrive (no timers: the in-process runner cannot mix processing-time
timers with the Kafka source). When its files change (rewritten in place, a
symlink re-pointed, a newer artifact in a registry folder; see
:func:`models.artifact.resolve_model_dir`), the new artifact is loaded and
checked and serves from the next event on. One that fails to load is logged
and the artifact serving now goes on serving. Every score carries the
model_version that made it.

Compatibility of device state across models: a detector's state (baseline,
evidence weights, alarm level, LSTM ``(h, c)``) means something only for the
model that built it. Each device keeps one detector state per
:attr:`models.artifact.ModelArtifact.state_signature` it is served by. A new
artifact with the same signature (re-labelled, new threshold) continues the
devices' states; any other starts each device afresh at its next event: the
device recalibrates over ``calibration_events`` events, without alarms. A
model that ran as shadow or canary keeps its warm per-device state when it is
promoted to primary, because the state is found by signature.

Why not RunInference's model-update side input: everything that differs
between versions runs in the per-device DoFn, in step with each device's
hidden state; the head in RunInference has no weights (models/lstm.py). And
a side input fed by a folder watcher needs processing-time timers, which
DirectRunner's in-process runner cannot run beside the Kafka source.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Generic, NamedTuple, Optional, TypeVar

from models.artifact import ModelArtifact, ModelArtifactError, load_artifact, resolve_model_dir
from models.detector import DeviceDetector

_LOG = logging.getLogger(__name__)

PRIMARY, CANARY, SHADOW = "primary", "canary", "shadow"
_CANARY_BUCKETS = 10_000

T = TypeVar("T")


class RolloutError(ValueError):
    """The rollout options do not make sense together."""


class ServedModel(NamedTuple):
    """What a score needs to know about the model that made it; travels with each event to the score."""

    role: str
    version: str
    features: tuple[str, ...]
    threshold: float


class ServingModel(NamedTuple):
    """A loaded artifact ready for the device DoFn."""

    served: ServedModel
    signature: str
    detector: DeviceDetector


def serving_model(artifact: ModelArtifact, role: str, calibration_events: int, quantize: str = "none") -> ServingModel:
    detector = artifact.detector(calibration_events, quantize)
    served = ServedModel(role, artifact.version, artifact.features, artifact.threshold)
    return ServingModel(served, f"{artifact.state_signature}-{quantize}", detector)


def in_canary(device_id: str, percent: float) -> bool:
    """Whether the canary serves this device: the same answer in every process, run and machine."""
    digest = hashlib.blake2b(device_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % _CANARY_BUCKETS < percent * _CANARY_BUCKETS / 100


class ModelRoster(NamedTuple):
    """The models serving at one moment."""

    primary: ServingModel
    canary: Optional[ServingModel] = None
    canary_percent: float = 0.0
    shadow: Optional[ServingModel] = None

    def models_for(self, device_id: str) -> tuple[ServingModel, ...]:
        """The model that decides for the device first, then the shadow if there is one."""
        canary = self.canary is not None and in_canary(device_id, self.canary_percent)
        deciding = self.canary if canary else self.primary
        return (deciding, self.shadow) if self.shadow is not None else (deciding,)


ModelSource = Callable[[], ModelRoster]


def fixed_models(artifact: ModelArtifact, calibration_events: int, quantize: str = "none") -> ModelSource:
    """One primary model that never changes: offline tools, benchmarks, tests."""
    roster = ModelRoster(serving_model(artifact, PRIMARY, calibration_events, quantize))
    return lambda: roster


def folder_fingerprint(model_dir: str) -> tuple:
    """Changes whenever the artifact `model_dir` names, or any of its files, changes."""
    folder = resolve_model_dir(model_dir)
    stats = ((f.name, f.stat()) for f in folder.iterdir() if f.is_file())
    return str(folder), tuple(sorted((name, st.st_mtime_ns, st.st_size) for name, st in stats))


class FolderWatcher(Generic[T]):
    """What `build` makes of the artifact a model folder holds now, re-checked at most every `poll_s` s."""

    def __init__(self, model_dir: str, poll_s: float, build: Callable[[ModelArtifact], T]):
        self._model_dir = model_dir
        self._poll_s = poll_s
        self._build = build
        self._lock = threading.Lock()
        self._fingerprint = folder_fingerprint(model_dir)
        self._failed: Optional[tuple] = None
        artifact = load_artifact(model_dir)
        self._version = artifact.version
        self._current = build(artifact)
        self._next_check = time.monotonic() + poll_s

    def current(self) -> T:
        if self._poll_s > 0 and time.monotonic() >= self._next_check:
            with self._lock:
                if time.monotonic() >= self._next_check:
                    self._refresh()
                    self._next_check = time.monotonic() + self._poll_s
        return self._current

    def _refresh(self) -> None:
        try:
            fingerprint = folder_fingerprint(self._model_dir)
        except OSError as e:
            self._keep_serving(e)
            return
        if fingerprint in (self._fingerprint, self._failed):
            return
        try:
            artifact = load_artifact(self._model_dir)
        except (ModelArtifactError, OSError) as e:
            self._failed = fingerprint  # retried once the files change again
            self._keep_serving(e)
            return
        self._fingerprint, self._failed = fingerprint, None
        if artifact.version != self._version:
            _LOG.info("model swap in %s: %s -> %s", self._model_dir, self._version, artifact.version)
        self._version = artifact.version
        self._current = self._build(artifact)

    def _keep_serving(self, error: Exception) -> None:
        _LOG.warning("%s changed but cannot be loaded (%s); model %s goes on serving", self._model_dir, error,
                     self._version)


@dataclass(frozen=True)
class RolloutConfig:
    """The model options of a job (see beam_jobs/options.py, group Model rollout)."""

    model_dir: str
    calibration_events: int
    quantize: str = "none"
    poll_s: float = 0.0
    canary_model_dir: Optional[str] = None
    canary_percent: float = 0.0
    shadow_model_dir: Optional[str] = None

    def check(self) -> None:
        """Fails at launch, naming the problem, on options that cannot work or a model that does not load."""
        if not 0.0 <= self.canary_percent <= 100.0:
            raise RolloutError(f"--canary_percent must be within 0..100, not {self.canary_percent}")
        if self.canary_model_dir and self.canary_percent == 0.0:
            raise RolloutError("--canary_model_dir needs --canary_percent, the share of devices it serves")
        if self.canary_percent and not self.canary_model_dir:
            raise RolloutError("--canary_percent needs --canary_model_dir, the model that serves those devices")
        if self.poll_s < 0:
            raise RolloutError(f"--model_poll_s must be 0 (load once) or positive, not {self.poll_s}")
        for folder in (self.model_dir, self.canary_model_dir, self.shadow_model_dir):
            if folder:
                load_artifact(folder)


class RolloutWatcher:
    """The roster of a RolloutConfig, following each model folder as it changes."""

    def __init__(self, config: RolloutConfig):
        self._config = config
        self._watchers = {
            role: FolderWatcher(folder, config.poll_s, functools.partial(
                serving_model, role=role, calibration_events=config.calibration_events, quantize=config.quantize))
            for role, folder in ((PRIMARY, config.model_dir), (CANARY, config.canary_model_dir),
                                 (SHADOW, config.shadow_model_dir)) if folder
        }
        self._models: tuple = ()
        self._roster: Optional[ModelRoster] = None

    def __call__(self) -> ModelRoster:
        models = tuple(watcher.current() for watcher in self._watchers.values())
        if len(models) != len(self._models) or any(a is not b for a, b in zip(models, self._models)):
            current = dict(zip(self._watchers, models))
            self._roster = ModelRoster(current[PRIMARY], current.get(CANARY), self._config.canary_percent,
                                       current.get(SHADOW))
            self._models = models
        return self._roster


@functools.lru_cache(maxsize=None)
def watch_models(config: RolloutConfig) -> RolloutWatcher:
    """One watcher per worker process and configuration: every DoFn instance sees the same swap."""
    return RolloutWatcher(config)
