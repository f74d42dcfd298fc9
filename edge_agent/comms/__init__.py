"""Communication: the device's MQTT side and its local control socket.

* :mod:`.client` makes a paho client, :mod:`.mqtt` holds the agent's one
  connection (:class:`~edge_agent.comms.mqtt.MqttTransport`), :mod:`.topics`
  builds and parses every topic;
* :mod:`.plane` wires the MQTT plane (:class:`~edge_agent.comms.plane.MqttPlane`):
  command topics to worker threads to the dispatcher, the outbox, telemetry,
  bundle fetching (:mod:`.download`, :mod:`.transfer`), the spool
  (:mod:`.spool`);
* :mod:`.commands` (schemas), :mod:`.dispatcher` (one reply per command),
  :mod:`.journal` (what outlives a crash) and :mod:`.handlers` (what each
  command does) serve both the MQTT plane and :mod:`.local`, the Unix socket
  of ``edge-agent models``.

Nothing is imported here: each user imports the module it needs.
"""
