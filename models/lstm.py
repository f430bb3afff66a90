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

import numpy as np
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
        # s_j of the level statistic (models/detector.py): how far training devices wander after calibration
        self.register_buffer("level_scale", torch.ones(n_features))

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


class NumpyRecurrentStep:
    """:class:`RecurrentStep` in float32 numpy, one event: (z_t, h, c) -> (h', c', ẑ_{t+1}) as 1-D arrays.

    The per-device DoFn steps one event at a time, where a torch call costs
    about 60-80 µs in dispatch for a few hundred multiply-adds; this costs
    about 15 µs. Results equal the module's to float32 rounding (a few 1e-7
    over thousands of steps), not bit for bit: torch and numpy's BLAS sum the
    gate products in different orders. The gates follow the module's order of
    operations: ``(W_ih·x + b_ih) + (W_hh·h + b_hh)``, then i, f, g, o.
    """

    def __init__(self, step: RecurrentStep):
        cell = step.cell
        with torch.no_grad():
            self._w_ih = cell.weight_ih.numpy().copy()
            self._w_hh = cell.weight_hh.numpy().copy()
            self._b_ih = cell.bias_ih.numpy().copy()
            self._b_hh = cell.bias_hh.numpy().copy()
            self._w_out = step.head.weight.numpy().copy()
            self._b_out = step.head.bias.numpy().copy()
            self._ar = step.ar.numpy().copy()
        self.hidden_size = cell.hidden_size

    def __call__(self, z: np.ndarray, h: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = self.hidden_size
        gates = self._w_ih @ np.clip(z, -INPUT_CLIP, INPUT_CLIP)
        gates += self._b_ih
        hidden = self._w_hh @ h
        hidden += self._b_hh
        gates += hidden
        sigmoid = 1.0 / (1.0 + np.exp(-gates))  # tanh is only taken of the cell gate
        c = sigmoid[n : 2 * n] * c + sigmoid[:n] * np.tanh(gates[2 * n : 3 * n])
        h = sigmoid[3 * n :] * np.tanh(c)
        forecast = self._w_out @ h
        forecast += self._b_out
        return h, c, self._ar * z + forecast


class _TorchStep:
    """A torch step module (int8-quantised) behind the numpy interface of :class:`NumpyRecurrentStep`."""

    def __init__(self, module: nn.Module):
        self._module = module
        self.hidden_size = module.cell.hidden_size

    def __call__(self, z: np.ndarray, h: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with torch.no_grad():
            h, c, forecast = self._module(torch.from_numpy(z)[None], torch.from_numpy(h)[None],
                                          torch.from_numpy(c)[None])
        return h[0].numpy(), c[0].numpy(), forecast[0].numpy()


def numpy_step(module: nn.Module) -> NumpyRecurrentStep | _TorchStep:
    """The one-event step on numpy arrays: numpy maths for a float RecurrentStep, the module itself for int8."""
    if isinstance(module, RecurrentStep) and type(module.cell) is nn.LSTMCell and type(module.head) is nn.Linear:
        return NumpyRecurrentStep(module)
    return _TorchStep(module)


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
