"""The blind user study: vote storage (SQLite, single-use tokens) and its statistics."""
