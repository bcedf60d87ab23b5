"""Terminal simulators: MQTT loudspeakers and serial buses that speak ebcd's real wire protocols."""
