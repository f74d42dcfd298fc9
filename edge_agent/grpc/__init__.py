"""TF Serving's gRPC API (``[grpc]``): ``tensorflow.serving.PredictionService``
and ``ModelService``, wire-compatible with TF Serving's protos, so clients
written against ``tensorflow_serving.apis`` work unchanged.

``protos/`` holds the trimmed .proto files (TF Serving's and TensorFlow's
package names and field numbers) and the modules generated from them
(``scripts/gen_protos.sh`` regenerates them). Imported only when
``[grpc] enabled = true``; grpcio and protobuf come with the ``grpc`` extra.
"""
