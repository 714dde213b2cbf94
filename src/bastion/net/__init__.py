"""Outbound networking: the policy every URL Bastion fetches on someone's behalf must pass."""
