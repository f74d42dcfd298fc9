"""The serving core: transport-neutral predict, metadata and status.

HTTP (:mod:`edge_agent.http.api`) and gRPC both call it; it imports no HTTP
or gRPC code. :mod:`.errors` holds :class:`ServingError` (a status code as
TF Serving names it, and a message), :mod:`.signature` a model's
``serving_default`` signature, :mod:`.predict` the :class:`Predictor`, which
takes raw named tensors for any model and gives back every output.
"""

from edge_agent.serving.errors import ServingError
from edge_agent.serving.predict import PredictResult, Predictor, VersionStatus
from edge_agent.serving.signature import SIGNATURE_NAME, Signature, TensorInfo, signature_of

__all__ = ["ServingError", "PredictResult", "Predictor", "VersionStatus", "SIGNATURE_NAME", "Signature",
           "TensorInfo", "signature_of"]
