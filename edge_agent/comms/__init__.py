"""Communication: the MQTT transport and what rides on it."""
