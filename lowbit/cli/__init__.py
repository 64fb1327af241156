"""The `lowbit` command line."""
