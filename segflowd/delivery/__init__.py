"""Delivery: the outbox and its workers, templates, MIME and the text part, the render pool,
tracking links and their tokens, and provider webhooks. The plugin interface providers
implement is the core module :mod:`segflowd.providers`."""
