"""Command-line entry points: `mailqd` (the daemon) and `mailqctl` (the operator CLI)."""
