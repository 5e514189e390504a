"""Configs, in one place: `load` reads a task's JSON and merges the defaults, `legacy` reads the legacy
layouts and names, `schema` holds what the schemas say (defaults, docs, error wording) and `typed`
the frozen dataclasses the rest of the code reads. ("settings" is left to the formats' own word: a
checkpoint's copy of its train config, the SDK's inference settings.)"""
