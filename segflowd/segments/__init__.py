"""Segments: the segment queries, the engine that keeps membership current (entries and
exits), the transactions worker, and the durable cursors both read the event log with."""
