"""JSON schemas of the task configs, shipped as package data."""
