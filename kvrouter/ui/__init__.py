"""The dashboard's files (served at /ui by the router)."""
