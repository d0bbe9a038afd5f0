"""Nimbus: an open, self-hostable service for LLM-based agents."""

__version__ = "0.1.0"
