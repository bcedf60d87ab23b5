"""MQTT: topics and JSON payloads (codec, pure) and the client (link, the only aiomqtt importer)."""
