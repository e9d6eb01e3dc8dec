"""The message contract: record keys, the packed array format, and update compression."""
