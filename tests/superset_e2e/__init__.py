"""End-to-end tests against real Apache Superset 6.1.0 (run once, in the sqla14 stack)."""
