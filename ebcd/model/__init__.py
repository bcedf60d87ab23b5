"""Pure data: the alert as asked for, resource codes and the event-type table (no I/O)."""
