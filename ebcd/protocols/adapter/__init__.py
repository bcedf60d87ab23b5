"""Vendor adapters (大喇叭适配器): the 0x49/0x50 frame codec (pure) and the TCP link."""
