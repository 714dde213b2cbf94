"""Change events: what caches must forget. In-process now; carried across replicas by PostgreSQL later."""
