"""Data: pool files (`io`), validated and id'd examples and target sets (`prepare`), the bundled demo (`demo`)."""
