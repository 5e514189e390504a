"""Configs, in one place: `load` reads a task's JSON and merges the defaults, `legacy` reads the legacy
layouts and names, `schema` holds what the schemas say (defaults, docs, error wording) and `settings`
the typed settings the rest of the code reads."""
