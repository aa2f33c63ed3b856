"""Rendering only: what the commands print and write for people."""
