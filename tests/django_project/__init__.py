"""A Django project for tests/test_django_backend.py: settings only, no apps of its own."""
