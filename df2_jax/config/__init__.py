"""Configs: every field's one default (``defaults``), its rules (``rules``), and the config a
run saved with its checkpoints (``run_config``)."""
