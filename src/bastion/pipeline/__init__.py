"""The call pipeline: what every MCP call passes between the web layer's door and the upstream, whichever relay
carries its bytes (admission, error mapping, reading and relaying the upstream's answer)."""
