"""The local control socket: framing and peers (socket), and what each request does (handler)."""
