"""The RunInference model handler: Beam's PyTorch handler around the scoring head.

Examples are keyed by their scoring context, so the metadata of each event
travels through RunInference untouched while the tensors are batched across
devices.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch
from apache_beam.ml.inference.base import KeyedModelHandler, PredictionResult
from apache_beam.ml.inference.pytorch_inference import PytorchModelHandlerTensor

from models.artifact import ModelArtifact
from models.lstm import ScoringHead


def rows_inference_fn(batch: Sequence[Any], model: torch.nn.Module, device: torch.device,
                      inference_args: Optional[dict[str, Any]] = None,
                      model_id: Optional[str] = None) -> list[PredictionResult]:
    """The model over a batch of rows (numpy arrays or CPU tensors); each result's inference is a numpy row.

    Beam's default stacks tensors and then hands back each row of the output
    as a tensor of its own, one torch call per row: most of the head's cost
    per event. Here the rows are stacked once, the output comes back as one
    numpy array, and each result holds a view of its row. The numbers are the
    same: the same float32 rows through the same model.
    """
    with torch.no_grad():
        rows = torch.from_numpy(np.stack([np.asarray(row) for row in batch]))
        if rows.device != device:
            rows = rows.to(device)
        output = model(rows, **(inference_args or {})).cpu().numpy()
    return [PredictionResult(example, row, model_id) for example, row in zip(batch, output)]


def scoring_model_handler(artifact: ModelArtifact, *, max_batch_size: int, device: str = "CPU") -> KeyedModelHandler:
    """A keyed PyTorch handler that loads the artifact's head.pt.

    No ``max_batch_duration_secs``: it adds processing-time timers, which the
    in-process runner cannot combine with the Kafka source. Batches therefore
    never outlive a bundle, and no event waits for a batch to fill.
    """
    return KeyedModelHandler(
        PytorchModelHandlerTensor(
            state_dict_path=artifact.head_path,
            model_class=ScoringHead,
            model_params=artifact.head_params(),
            device=device,
            inference_fn=rows_inference_fn,
            min_batch_size=1,
            max_batch_size=max_batch_size,
        )
    )
