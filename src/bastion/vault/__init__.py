"""The vault: AES-256-GCM envelope encryption of every stored credential."""
