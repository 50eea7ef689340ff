"""The training pipeline that wires every layer in order, its summary, the dry run and its estimates."""
