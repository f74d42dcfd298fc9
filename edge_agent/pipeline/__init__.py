"""The frame path: frame -> preprocess -> model -> postprocess -> result -> sinks.

* :mod:`.worker`: :class:`~edge_agent.pipeline.worker.SourceWorker`, one
  thread per source running a list of stages per frame, and its settings
* :mod:`.stages`: the stages (the fps slot, taking the newest frame,
  inference, the result throttle, the result envelope, the sinks) and the
  context they pass on
* :mod:`.detection`: a detector source's stage after inference: filters,
  zones (:mod:`.zones`), the tracker (:mod:`.tracking`), detection events
  and zone counts
* :mod:`.sinks`: the sink protocol and the log sink
* :mod:`.preprocess`: frame -> input tensor, as the manifest says
* :mod:`.postprocess`: outputs -> ``top`` / ``detections``, one module per
  decoder family

The package imports none of them: the model code imports pre- and
postprocessing without the worker (which imports the model manager).
"""
