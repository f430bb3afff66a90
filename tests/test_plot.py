"""The plot tool draws a device from the golden recording and its scores."""

from __future__ import annotations

import pytest

from beam_jobs import plot
from tests.test_file_mode import GOLDEN


def test_plot_writes_an_image_of_one_device(tmp_path, capsys):
    output = tmp_path / "device.png"
    plot.main(["--scores", str(GOLDEN / "scores.avro"), "--events", str(GOLDEN / "recording.avro"),
               "--device", "line1-press-000", "--output", str(output)])
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "150 scores, 150 events" in capsys.readouterr().err


def test_plot_of_an_unknown_device_fails_clearly(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        plot.main(["--scores", str(GOLDEN / "scores.avro"), "--device", "nope", "--output", str(tmp_path / "x.png")])
    assert exit_info.value.code == 2 and "no scores of device 'nope'" in capsys.readouterr().err
