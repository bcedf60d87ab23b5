"""Wire protocols: codecs (pure, no I/O) and the links that carry them (MQTT, serial)."""
