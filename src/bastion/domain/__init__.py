"""Pure rules and dataclasses. Imports no web framework, HTTP client or database library."""
