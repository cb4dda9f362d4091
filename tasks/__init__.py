"""deqlab tasks: one package per task, each with its data and model."""
