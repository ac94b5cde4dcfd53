"""The `helix` command: operators' commands and a user's everyday ones."""
