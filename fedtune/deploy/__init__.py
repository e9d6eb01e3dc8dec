"""Deployment: keys and certificates, and thin wrappers around Flower's SuperLink and SuperNode."""
