"""Sources: read-only pools on the customer's databases, the data sources that run over them,
audience syncs and broadcasts. What a user's app declares of them lives in the core
(:mod:`segflowd.sourcedefs`, :mod:`segflowd.placeholders`)."""
