"""The LSTM next-step forecaster, split where the streaming job splits it.

The recurrence (:class:`NumpyLstmCell`) runs one step per event inside the
per-device stateful DoFn, because only there is the hidden state. The scoring
head (:class:`ScoringHead`) is stateless, so RunInference batches it across
devices. :class:`LstmForecaster` is the same model over whole sequences, for
training and for checking that streaming equals batch.

Input at step t is ``[x_t, m_t]``: the normalised, imputed readings and the
mask of readings that were observed. The head forecasts ``x_t`` from
``h_{t-1}``; the score is the mean squared standardised residual over the
observed features, and each feature's contribution is its share of it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class LstmForecaster(nn.Module):
    """Forecasts each step's readings from the hidden state before it."""

    def __init__(self, n_features: int, hidden_size: int = 32):
        super().__init__()
        self.n_features = n_features
        self.hidden_size = hidden_size
        self.lstm = nn.LSTM(2 * n_features, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, n_features)

    def hidden_before_each_step(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """h_{t-1} for every t of (batch, time, features) inputs, h_{-1} = 0."""
        outputs, _ = self.lstm(torch.cat([x, mask], dim=-1))
        zeros = torch.zeros_like(outputs[:, :1])
        return torch.cat([zeros, outputs[:, :-1]], dim=1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Forecasts of x_t for every t."""
        return self.head(self.hidden_before_each_step(x, mask))


def score_residuals(
    x: torch.Tensor, mask: torch.Tensor, forecast: torch.Tensor, residual_scale: torch.Tensor
) -> torch.Tensor:
    """[score, contribution_1..F] for each row; contributions sum to 1 when score > 0."""
    squared = mask * ((x - forecast) / residual_scale) ** 2
    total = squared.sum(dim=-1, keepdim=True)
    observed = mask.sum(dim=-1, keepdim=True).clamp(min=1.0)
    shares = torch.where(total > 0, squared / total.clamp(min=1e-12), torch.zeros_like(squared))
    return torch.cat([total / observed, shares], dim=-1)


class ScoringHead(nn.Module):
    """The stateless part: rows of ``[h_{t-1}, x_t, m_t]`` to ``[score, contributions]``."""

    def __init__(self, n_features: int, hidden_size: int):
        super().__init__()
        self.n_features = n_features
        self.hidden_size = hidden_size
        self.head = nn.Linear(hidden_size, n_features)
        self.register_buffer("residual_scale", torch.ones(n_features))

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        h, x, mask = torch.split(rows, [self.hidden_size, self.n_features, self.n_features], dim=-1)
        return score_residuals(x, mask, self.head(h), self.residual_scale)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (np.tanh(0.5 * z) + 1.0)


class NumpyLstmCell:
    """One LSTM step in numpy: a torch call per event costs more than the maths.

    Weights are copied from layer 0 of a torch ``nn.LSTM`` (gate order i, f, g, o).
    """

    def __init__(self, lstm: nn.LSTM):
        self.hidden_size = lstm.hidden_size
        w = torch.cat([lstm.weight_ih_l0, lstm.weight_hh_l0], dim=1).detach()
        self._weights = w.numpy().astype(np.float32)
        self._bias = (lstm.bias_ih_l0 + lstm.bias_hh_l0).detach().numpy().astype(np.float32)

    def initial_state(self) -> tuple[np.ndarray, np.ndarray]:
        zeros = np.zeros(self.hidden_size, dtype=np.float32)
        return zeros, zeros.copy()

    def step(self, inputs: np.ndarray, h: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        gates = self._weights @ np.concatenate([inputs, h]) + self._bias
        i, f, g, o = np.split(gates, 4)
        c_next = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
        return _sigmoid(o) * np.tanh(c_next), c_next
