"""The daemon: builds the parts and wires them together; the service wrapper for systemd."""
