"""Exporters from a pruned prefill program to deployable engines, and the bundle they are shipped in."""
