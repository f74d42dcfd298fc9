"""A TF Serving gRPC client written exactly as TF Serving's users write it
(tensorflow_serving.apis + tf.make_tensor_proto / tf.make_ndarray), run by
tests/test_grpc_tfserving.py in TF Serving's own client environment
(scripts/setup_tfserving_client.sh), never in the agent's.

    python tfserving_client.py HOST:PORT MODEL INPUT OUTPUT IN.npy OUT.json

Writes a JSON object: the Predict answer (the output as a list, its dtype and
the version that answered), the GetModelMetadata signature, the
GetModelStatus states, and the status code of a request for an unknown
model and of one with a wrong input name.
"""

import json
import sys

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.apis import model_service_pb2_grpc
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

target, model, input_name, output_name, in_path, out_path = sys.argv[1:7]
x = np.load(in_path)

# -- the client as TF Serving's examples write it ---------------------------
channel = grpc.insecure_channel(target)
stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
request = predict_pb2.PredictRequest()
request.model_spec.name = model
request.model_spec.signature_name = "serving_default"
request.inputs[input_name].CopyFrom(tf.make_tensor_proto(x))
result = stub.Predict(request, 10.0)  # 10 secs timeout
y = tf.make_ndarray(result.outputs[output_name])

# -- metadata and status -------------------------------------------------------
meta_request = get_model_metadata_pb2.GetModelMetadataRequest()
meta_request.model_spec.name = model
meta_request.metadata_field.append("signature_def")
meta = stub.GetModelMetadata(meta_request, 10.0)
signature_map = get_model_metadata_pb2.SignatureDefMap()
meta.metadata["signature_def"].Unpack(signature_map)
signature = signature_map.signature_def["serving_default"]

status_request = get_model_status_pb2.GetModelStatusRequest()
status_request.model_spec.name = model
status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(status_request, 10.0)


def code_of(req):
    try:
        stub.Predict(req, 10.0)
    except grpc.RpcError as err:
        return [err.code().name, err.details()]
    return ["OK", ""]


unknown = predict_pb2.PredictRequest()
unknown.CopyFrom(request)
unknown.model_spec.name = "no_such_model"
wrong_input = predict_pb2.PredictRequest()
wrong_input.model_spec.name = model
wrong_input.inputs["not_" + input_name].CopyFrom(tf.make_tensor_proto(x))

with open(out_path, "w") as f:
    json.dump({
        "output": y.tolist(), "dtype": str(y.dtype), "shape": list(y.shape),
        "model_spec": [result.model_spec.name, result.model_spec.version.value, result.model_spec.signature_name],
        "signature": {
            "method_name": signature.method_name,
            "inputs": {k: [tf.dtypes.as_dtype(v.dtype).name, [d.size for d in v.tensor_shape.dim]]
                       for k, v in signature.inputs.items()},
            "outputs": {k: [tf.dtypes.as_dtype(v.dtype).name, [d.size for d in v.tensor_shape.dim]]
                        for k, v in signature.outputs.items()},
        },
        "status": [[s.version, get_model_status_pb2.ModelVersionStatus.State.Name(s.state)]
                   for s in status.model_version_status],
        "unknown_model": code_of(unknown),
        "wrong_input": code_of(wrong_input),
    }, f)
