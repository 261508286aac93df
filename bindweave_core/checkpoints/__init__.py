"""Finding, identifying and lazily loading model files."""
