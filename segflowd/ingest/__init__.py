"""Ingest: the HTTP APIs (native, Segment, Customer.io), their auth and payloads, and the
group commit that makes a 2xx mean the data is stored. Data flows on to segments and flows."""
