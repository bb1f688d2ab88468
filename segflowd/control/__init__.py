"""Control: the unix-socket service, its JSON-lines protocol, a client of it, and the snapshot
queries it answers. segflow-tui and the CLI's admin commands speak only to this."""
