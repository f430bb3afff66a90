"""The RunInference model handler: Beam's PyTorch handler around the scoring head.

Examples are keyed by their scoring context, so the metadata of each event
travels through RunInference untouched while the tensors are batched across
devices.
"""

from __future__ import annotations

from apache_beam.ml.inference.base import KeyedModelHandler
from apache_beam.ml.inference.pytorch_inference import PytorchModelHandlerTensor

from models.artifact import ModelArtifact
from models.lstm import ScoringHead


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
            min_batch_size=1,
            max_batch_size=max_batch_size,
        )
    )
