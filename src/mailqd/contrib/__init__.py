"""Integrations with frameworks, each an optional extra (`pip install mailqd[django]`).

Nothing here is imported by `import mailqd`; each integration imports its
framework itself, and only it may (tests/test_import_contracts.py).
"""
