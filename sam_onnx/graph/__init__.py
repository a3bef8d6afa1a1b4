"""Graphs as files and protobufs: read them, their signature and recorded metadata, the feeds
they take, validate's rules, and the repair passes. Never runs a graph (the runtime does)."""
