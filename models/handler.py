"""The RunInference model handler for the scoring head.

Examples are keyed by their scoring context, so the metadata of each event
travels through RunInference untouched while the rows are batched across
devices. The head has no weights and reads the feature count off the row
width (models/lstm.py), so one head serves every model version and rollout
role: it is built on the worker, and no file path from the launcher has to
exist there. Rows come in and results go out as numpy arrays: runners sample
elements and pickle them to estimate sizes, and a tensor pickles through
torch.save (a row of the batch output with the whole batch's storage).
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, PredictionResult

from models.lstm import ScoringHead

_LOG = logging.getLogger(__name__)


class ScoringHeadHandler(ModelHandler[np.ndarray, PredictionResult, ScoringHead]):
    """Runs ScoringHead on stacked rows, on the GPU when asked for and present.

    No ``max_batch_duration_secs``: it adds processing-time timers, which the
    in-process runner cannot combine with the Kafka source. Batches therefore
    never outlive a bundle, and no event waits for a batch to fill.
    """

    def __init__(self, *, max_batch_size: int, device: str = "CPU"):
        super().__init__()
        self._max_batch_size = max_batch_size
        self._device_name = device
        self._device = torch.device("cpu")

    def load_model(self) -> ScoringHead:
        if self._device_name == "GPU":
            if torch.cuda.is_available():
                self._device = torch.device("cuda")
            else:
                _LOG.warning("--inference_device GPU, but torch sees no GPU here: the head runs on the CPU")
        return ScoringHead().to(self._device).eval()

    def run_inference(self, batch: Sequence[np.ndarray], model: ScoringHead,
                      inference_args: Optional[dict[str, Any]] = None) -> Iterable[PredictionResult]:
        with torch.no_grad():
            outputs = model(torch.from_numpy(np.stack(batch)).to(self._device), **(inference_args or {}))
        return [PredictionResult(row, output) for row, output in zip(batch, outputs.cpu().numpy())]

    def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
        return sum(row.nbytes for row in batch)

    def get_metrics_namespace(self) -> str:
        return "scoring_head"

    def batch_elements_kwargs(self) -> dict[str, int]:
        return {"min_batch_size": self._max_batch_size, "max_batch_size": self._max_batch_size}


def scoring_model_handler(*, max_batch_size: int, device: str = "CPU") -> KeyedModelHandler:
    """The keyed handler ScoreEvents runs: (ScoringContext, row) in, (ScoringContext, PredictionResult) out."""
    return KeyedModelHandler(ScoringHeadHandler(max_batch_size=max_batch_size, device=device))
