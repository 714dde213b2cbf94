"""The MCP endpoint of every gateway: `/g/{gateway}/mcp`, both protocol eras, authenticated per request."""
