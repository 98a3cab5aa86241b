"""`make bench`: the module measured against the machine's own limits, side by side."""
