"""REST routes, grouped by resource. Each route parses, calls a service, and returns a schema."""
