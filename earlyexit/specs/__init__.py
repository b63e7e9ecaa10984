"""Built-in bench specs (TOML): `embedded` (every strategy on the embedded model, CPU) and `paper`
(the paper's models, data and settings, on GPUs). `earlyexit bench NAME --dry-run` lists their cells."""
