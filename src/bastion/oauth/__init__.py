"""Bastion as an OAuth 2.1 client of upstream MCP servers (MCP authorization spec), and as an OIDC relying party."""
