"""Use cases over the registry. Services flush but never commit: the caller's session scope does."""
