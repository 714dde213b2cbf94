"""The `bastion` command line: the same services as the API, on the local database."""
