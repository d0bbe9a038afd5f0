"""Nimbus testing."""
