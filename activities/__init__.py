"""Side-effecting steps of the workflows. Thin: parse input, call training/ or a client."""
