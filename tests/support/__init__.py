"""Helpers shared by the integration, conformance and e2e tests."""
