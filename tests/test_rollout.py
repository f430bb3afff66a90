"""Model rollout without a pipeline: canary assignment, folder watching, state compatibility across swaps."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from models.artifact import BUNDLED_MODEL_DIR, ModelArtifactError, load_artifact, resolve_model_dir
from models.rollout import (
    CANARY,
    PRIMARY,
    SHADOW,
    FolderWatcher,
    ModelRoster,
    RolloutConfig,
    RolloutError,
    RolloutWatcher,
    in_canary,
    serving_model,
)
from tests.rollout_helpers import model_variant
from transforms.device_state import DeviceLogic

CALIBRATION = 10
BUNDLED = load_artifact(BUNDLED_MODEL_DIR)


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("variants")
    return {
        "relabelled": model_variant(root / "relabelled", "relabelled-v2"),
        "retuned": model_variant(root / "retuned", "retuned-v3", cap=6.0, factor=1.2),
    }


def serving(path: Path | str, role: str = PRIMARY):
    return serving_model(load_artifact(path), role, CALIBRATION)


class Switchable:
    """A model source the test switches by hand, as the folder watcher would."""

    def __init__(self, roster: ModelRoster):
        self.roster = roster

    def __call__(self) -> ModelRoster:
        return self.roster


def readings(i: int) -> dict:
    rng = np.random.default_rng(i)
    return {name: float(50 + 3 * np.sin(i / 9 + k) + rng.normal(0, 0.5)) for k, name in enumerate(BUNDLED.features)}


def run(logic: DeviceLogic, times: range, state=None, device: str = "pump-1", switch=None) -> tuple[list, object]:
    """Steps of one device; `switch(i)` may change the roster before event i."""
    steps = []
    for i in times:
        if switch:
            switch(i)
        step = logic.on_event(state, 1_750_000_000_000 + i * 1000, readings(i), "in:0", device)
        state = step.state
        steps.append(step)
    return steps, state


def test_canary_share_is_stable_and_close_to_the_percent():
    ids = [f"device-{i:05d}" for i in range(20_000)]
    share = np.mean([in_canary(d, 10.0) for d in ids])
    assert 0.09 < share < 0.11
    assert not any(in_canary(d, 0.0) for d in ids[:1000]) and all(in_canary(d, 100.0) for d in ids[:1000])
    # A fixed hash, not Python's salted one: these answers are the same in every process and on every machine.
    assert [i for i in range(40) if in_canary(f"device-{i:05d}", 10.0)] == [2, 6, 11, 32, 35, 38]


def test_the_deciding_model_is_the_canary_for_canary_devices_and_the_shadow_comes_second(variants):
    roster = ModelRoster(serving(BUNDLED_MODEL_DIR), serving(variants["retuned"], CANARY), 50.0,
                         serving(variants["relabelled"], SHADOW))
    for device in (f"d{i}" for i in range(50)):
        deciding, shadow = roster.models_for(device)
        assert deciding.served.role == (CANARY if in_canary(device, 50.0) else PRIMARY)
        assert shadow.served.role == SHADOW and shadow.served.version == "relabelled-v2"


def test_a_swap_to_the_same_signature_keeps_device_state(variants):
    """A re-labelled model continues every device's state: the scores are those of no swap, the version is new."""
    original, relabelled = serving(BUNDLED_MODEL_DIR), serving(variants["relabelled"])
    assert original.signature == relabelled.signature
    unswapped, _ = run(DeviceLogic(Switchable(ModelRoster(original)), 60_000), range(40))
    source = Switchable(ModelRoster(original))
    swapped, _ = run(DeviceLogic(source, 60_000), range(40),
                     switch=lambda i: setattr(source, "roster", ModelRoster(relabelled)) if i == 25 else None)
    for a, b in zip(unswapped, swapped):
        np.testing.assert_array_equal(a.model_input, b.model_input)
    assert {s.steps[0].model.version for s in swapped[25:]} == {"relabelled-v2"}
    assert {s.steps[0].model.version for s in swapped[:25]} == {BUNDLED.version}


def test_a_swap_to_another_model_recalibrates_each_device(variants):
    source = Switchable(ModelRoster(serving(BUNDLED_MODEL_DIR)))
    steps, state = run(DeviceLogic(source, 60_000), range(35),
                       switch=lambda i: setattr(source, "roster", ModelRoster(serving(variants["retuned"])))
                       if i == 20 else None)
    assert not steps[19].calibrating
    assert all(s.calibrating for s in steps[20:20 + CALIBRATION]) and not steps[20 + CALIBRATION].calibrating
    assert list(state.detectors) == [serving(variants["retuned"]).signature]  # the old model's state is gone


def test_a_promoted_shadow_continues_its_warm_state(variants):
    """Shadow for 30 events, then primary: no recalibration, the same rows as if it had always been primary."""
    retuned = serving(variants["retuned"])
    always, _ = run(DeviceLogic(Switchable(ModelRoster(retuned)), 60_000), range(40))
    source = Switchable(ModelRoster(serving(BUNDLED_MODEL_DIR), shadow=serving(variants["retuned"], SHADOW)))
    promoted, _ = run(DeviceLogic(source, 60_000), range(40),
                      switch=lambda i: setattr(source, "roster", ModelRoster(retuned)) if i == 30 else None)
    assert [len(s.steps) for s in promoted] == [2] * 30 + [1] * 10
    for a, b in zip(always[30:], promoted[30:]):
        assert not b.calibrating
        np.testing.assert_array_equal(a.model_input, b.model_input)


def test_a_shadow_of_the_primary_model_does_not_step_the_shared_state_twice():
    plain, _ = run(DeviceLogic(Switchable(ModelRoster(serving(BUNDLED_MODEL_DIR))), 60_000), range(30))
    both = ModelRoster(serving(BUNDLED_MODEL_DIR), shadow=serving(BUNDLED_MODEL_DIR, SHADOW))
    doubled, _ = run(DeviceLogic(Switchable(both), 60_000), range(30))
    for a, b in zip(plain, doubled):
        np.testing.assert_array_equal(a.model_input, b.steps[0].model_input)
        np.testing.assert_array_equal(a.model_input, b.steps[1].model_input)


def _wait_for_version(watcher, version: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while watcher.current().version != version:
        assert time.monotonic() < deadline, f"still serving {watcher.current().version}, not {version}"
        time.sleep(0.02)


def test_watcher_follows_a_folder_rewritten_in_place_and_keeps_serving_through_a_broken_write(tmp_path, variants):
    folder = model_variant(tmp_path / "model", "v1")
    watcher = FolderWatcher(str(folder), 0.01, lambda artifact: artifact)
    assert watcher.current().version == "v1"
    (folder / "forecaster.pt").write_bytes(b"half written")
    time.sleep(0.05)
    assert watcher.current().version == "v1"  # the broken artifact never serves
    for name in ("forecaster.pt", "model.json"):
        shutil.copy(variants["retuned"] / name, folder / name)
    _wait_for_version(watcher, "retuned-v3")


def test_watcher_follows_a_symlink_and_the_newest_artifact_of_a_registry(tmp_path, variants):
    link = tmp_path / "current"
    link.symlink_to(variants["relabelled"])
    watcher = FolderWatcher(str(link), 0.01, lambda artifact: artifact)
    assert watcher.current().version == "relabelled-v2"
    temporary = tmp_path / "next"
    temporary.symlink_to(variants["retuned"])
    os.replace(temporary, link)  # the atomic re-point a deployment script does
    _wait_for_version(watcher, "retuned-v3")

    registry = tmp_path / "registry"
    model_variant(registry / "a-first", "first")
    registry_watcher = FolderWatcher(str(registry), 0.01, lambda artifact: artifact)
    assert registry_watcher.current().version == "first"
    model_variant(registry / "0-newer-by-time", "second")  # newest by write time, whatever its name
    _wait_for_version(registry_watcher, "second")
    assert resolve_model_dir(registry).name == "0-newer-by-time"


def test_the_rollout_watcher_builds_one_roster_per_change(tmp_path, variants):
    folder = model_variant(tmp_path / "model", "v1")
    watcher = RolloutWatcher(RolloutConfig(str(folder), CALIBRATION, poll_s=0.01,
                                           shadow_model_dir=str(variants["relabelled"])))
    first = watcher()
    assert watcher() is first and first.shadow.served.version == "relabelled-v2"
    shutil.copy(variants["retuned"] / "model.json", folder / "model.json")
    deadline = time.monotonic() + 5
    while watcher().primary.served.version != "retuned-v3":
        assert time.monotonic() < deadline
        time.sleep(0.02)


@pytest.mark.parametrize("config, message", [
    (dict(canary_percent=120.0, canary_model_dir="bundled"), "within 0..100"),
    (dict(canary_model_dir="bundled"), "needs --canary_percent"),
    (dict(canary_percent=5.0), "needs --canary_model_dir"),
    (dict(poll_s=-1.0), "--model_poll_s"),
])
def test_rollout_options_that_cannot_work_are_refused(config, message):
    with pytest.raises(RolloutError, match=message):
        RolloutConfig("bundled", CALIBRATION, **config).check()


def test_a_canary_or_shadow_that_does_not_load_is_refused_at_launch(tmp_path):
    with pytest.raises(ModelArtifactError, match="is not a model artifact"):
        RolloutConfig("bundled", CALIBRATION, shadow_model_dir=str(tmp_path)).check()


def test_the_default_model_is_named_bundled_and_found_where_the_package_is_installed():
    """The launcher's absolute path would not exist on Flink workers: the name travels, each worker resolves it."""
    from beam_jobs.options import SensorScoringOptions

    assert SensorScoringOptions([]).model_dir == "bundled"
    assert resolve_model_dir("bundled") == BUNDLED_MODEL_DIR
    assert load_artifact("bundled").version == BUNDLED.version
