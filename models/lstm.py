"""The LSTM next-step forecaster, and the parts the streaming job splits it into.

The forecast of the normalised readings ``z_t`` is

    ẑ_t = A ⊙ z_{t-1} + W·h_{t-1} + b,     h_t = LSTM(clip(z_t, ±3), h_{t-1})

``A`` is a per-feature AR(1) coefficient fitted before the LSTM and then
frozen: slowly drifting readings (temperatures) are forecast by their last
value, noisy ones around their calibration level, so a sustained level shift
leaves a sustained residual. The LSTM only learns a bounded correction on top;
because it sees clipped inputs it cannot follow a large shift.

:class:`LstmForecaster` runs whole sequences (training, and the batch oracle
the streaming path is tested against). :class:`RecurrentStep` is the same
model one event at a time, in the per-device DoFn: it advances ``(h, c)`` and
returns the forecast of the next event eagerly, because the per-device
evidence (see :mod:`models.detector`) needs the residual before the next event
arrives. :class:`ScoringHead` is the stateless end that RunInference batches
across devices: evidence in, score and contributions out.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

INPUT_CLIP = 3.0


class LstmForecaster(nn.Module):
    """Forecasts each step's normalised readings from the steps before it."""

    def __init__(self, n_features: int, hidden_size: int = 16):
        super().__init__()
        self.n_features = n_features
        self.hidden_size = hidden_size
        self.lstm = nn.LSTM(n_features, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, n_features)
        self.register_buffer("ar", torch.zeros(n_features))
        self.register_buffer("residual_scale", torch.ones(n_features))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Forecasts of z[:, 1:] for (batch, time, features) inputs."""
        hidden, _ = self.lstm(z.clamp(-INPUT_CLIP, INPUT_CLIP))
        return self.ar * z[:, :-1] + self.head(hidden[:, :-1])


class RecurrentStep(nn.Module):
    """One event of the forecaster: (z_t, h, c) -> (h', c', ẑ_{t+1}).

    The cell and the output layer are plain ``nn.LSTMCell``/``nn.Linear`` so
    ``torch.ao.quantization.quantize_dynamic`` can turn them into int8.
    """

    def __init__(self, forecaster: LstmForecaster):
        super().__init__()
        lstm = forecaster.lstm
        self.cell = nn.LSTMCell(lstm.input_size, lstm.hidden_size)
        with torch.no_grad():
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(self.cell, name).copy_(getattr(lstm, f"{name}_l0"))
        self.head = forecaster.head
        self.register_buffer("ar", forecaster.ar.clone())

    def forward(self, z: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h, c = self.cell(z.clamp(-INPUT_CLIP, INPUT_CLIP), (h, c))
        return h, c, self.ar * z + self.head(h)


def quantize_int8(step: RecurrentStep) -> nn.Module:
    """Dynamic int8 quantisation of the LSTM cell and the output layer (weights int8, activations per call)."""
    with warnings.catch_warnings():  # torch deprecates the eager API in favour of torchao, not installed here
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(step, {nn.LSTMCell, nn.Linear}, dtype=torch.qint8)


class ScoringHead(nn.Module):
    """The stateless end: rows of ``[evidence_1..F, observed_1..F, alarm_level]`` to ``[score, contributions]``.

    The score is the largest evidence among the observed readings, in units of
    the device's calibrated alarm level; a reading's contribution is its share
    of the summed evidence, so contributions add up to 1 and an imputed reading
    (observed = 0) has none. A zero alarm level (still calibrating) scores 0.

    It has no weights and reads the number of features off the row width, so
    one head serves every model version and role in RunInference.
    """

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        n_features = (rows.shape[-1] - 1) // 2
        evidence, observed, level = torch.split(rows, [n_features, n_features, 1], dim=-1)
        evidence = evidence * observed
        score = torch.where(level > 0, evidence.amax(dim=-1, keepdim=True) / level.clamp(min=1e-12), 0.0)
        total = evidence.sum(dim=-1, keepdim=True)
        shares = torch.where(total > 0, evidence / total.clamp(min=1e-12), torch.zeros_like(evidence))
        return torch.cat([score, shares], dim=-1)
