"""The jobs a command runs, each readable top to bottom: ``train`` (load, adapt, check, prepare, train, write)
and ``check`` (everything ``train`` does before step 1, and a report)."""
