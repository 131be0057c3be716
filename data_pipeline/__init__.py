"""data_pipeline package (built in its own issue)."""
