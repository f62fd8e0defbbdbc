"""scalex-scale."""
