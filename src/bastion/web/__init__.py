"""HTTP edges: the admin API, health endpoints and (later) the MCP endpoint and enrollment pages."""
