"""Click entrypoints: one module per job, grouped under the ``medreason`` command in cli.py."""
