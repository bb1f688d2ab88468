"""Flows: durable generator campaigns: the flow service, steps, the journal and its replay,
the runtime commands a flow yields, code versions, and the timer wheel."""
