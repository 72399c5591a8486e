"""Adapter file formats: reading and validating what users upload, without torch."""
