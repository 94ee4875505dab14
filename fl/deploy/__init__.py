"""Deployment helpers shared by the server and device sides (certificates, keys)."""
