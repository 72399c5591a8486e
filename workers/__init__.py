"""Everything that turns an expression into a new adapter: compiler, engine, pipeline, tasks."""
