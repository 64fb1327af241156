"""Model definitions and loaders."""
