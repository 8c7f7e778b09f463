"""The daemon: a pre-fork supervisor and its delivery workers."""
