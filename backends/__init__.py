"""Built-in backends, one module per model family (installed as `earlyexit.backends`)."""
