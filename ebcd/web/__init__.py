"""The duty room's read-only live page for the wall screen (`[web] listen`)."""
