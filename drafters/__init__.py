"""Built-in drafters: each module registers its drafter classes through `earlyexit_register_drafters`."""
