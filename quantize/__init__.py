"""The offline quantizer/pruner behind ``edge-agent quantize`` (workstation side).

This package is importable without the agent's camera or MQTT code and is the
only place allowed to import heavy workstation tools (onnx, onnx2tf). It is
built out by the quantizer issue; the device never imports it.
"""
