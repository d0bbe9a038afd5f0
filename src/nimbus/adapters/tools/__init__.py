"""Nimbus tools."""
