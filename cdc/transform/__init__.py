"""Pure functions over events between `events` and `publish`: privacy (exclude, mask, row filter)."""
