"""Nimbus bench."""
