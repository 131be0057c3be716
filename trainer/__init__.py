"""trainer package (built in its own issue)."""
