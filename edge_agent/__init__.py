"""edge-agent: an inference agent for fleets of edge devices.

The package is split by seam: ``runtimes`` (ONNX Runtime, LiteRT), ``sources``
(cameras, streams, files), ``models`` (bundles and the serving manager),
``pipeline`` (frame -> preprocess -> infer -> postprocess -> sinks) and
``comms`` (MQTT). ``edge_agent.cli`` is the command line.
"""

__version__ = "0.1.0"
