"""Nimbus cli."""
