"""The device side of AI at the sensor (issue #15): an agent that reads frames, runs a compact model on the CPU,
turns its outputs into results with an edge app and sends only those, through an on-disk outbox, over MQTT with
HTTP as the fallback. The protocol it speaks is `cumulo.contracts.edge`; docs/edge.md describes the whole."""
