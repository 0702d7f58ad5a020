"""The fleet side of AI at the sensor (issue #15): devices of an organisation, their enrolment and credentials,
the results they send (stored once per device and sequence number, metered, streamed to subscribers), their
desired and reported state, staged model rollouts with automatic rollback, and the MQTT bridge that the gateway
runs when `settings.edge_mqtt_url` is set. The protocol both ends speak is `cumulo.contracts.edge`.
"""
