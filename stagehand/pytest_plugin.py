"""Pytest fixtures for code that uses Stagehand (registered as ``pytest11``)."""
