"""`make bench`: the correlation engine measured against the machine and a reference."""
