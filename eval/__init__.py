"""eval package (built in its own issue)."""
