"""Serial rooms: the frame codec (pure) and the bus master (the only module that opens ports)."""
