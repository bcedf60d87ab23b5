"""How a request becomes an alert: parsing, de-duplication, authority, review and scheduled tests."""
