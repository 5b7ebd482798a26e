"""Helpers for tests and demos: multi-process launch over gloo and locally built tiny models."""
