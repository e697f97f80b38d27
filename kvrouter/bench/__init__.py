"""Load generation, reports and the speed benchmark (`kvrouter bench`, `make bench`)."""
