"""Retention: finished data older than ``[retention]`` says is pruned, in small batches, by a
background service; the rules of what is kept whatever its age, and the table walks."""
