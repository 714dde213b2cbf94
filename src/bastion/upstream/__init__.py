"""Upstream MCP clients: transports per server and a pool of open sessions per (identity, server)."""
