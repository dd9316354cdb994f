"""Edge engines; see ``edge_runtime.engine`` for the interface."""
