"""The journal: what ebcd must not forget, in SQLite, written by one thread."""
