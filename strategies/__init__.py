"""Built-in exit strategies, one module per method (installed as `earlyexit.strategies`)."""
