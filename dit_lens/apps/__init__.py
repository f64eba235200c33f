"""Applications on top of the library: the `dit-lens` command line (`cli`) and the demo (`demo`)."""
