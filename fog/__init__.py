"""The fog bridge: MQTT -> Kafka ingest (validate, dedupe, shape, dead-letter) and Kafka -> MQTT commands."""
