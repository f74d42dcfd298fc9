"""The local HTTP API (CONTRACT §5), only imported with ``[http] enabled``.

:mod:`.api` answers requests (TF Serving's REST subset, health, metrics) as
a pure request -> response layer over the collaborators the agent hands it;
:mod:`.metrics` keeps the Prometheus registry; :mod:`.server` is the
threaded HTTP server that reads requests off the wire and feeds them to the
API. Nothing here imports the agent.
"""
