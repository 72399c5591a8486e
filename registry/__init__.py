"""The adapter registry: settings, DB models, repositories, services, the artifact store and adapter formats."""
