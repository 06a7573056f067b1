"""Example models for tenfold, in plain torch. Package one with `tenfold package examples.<name>:build -o <name>.pt`."""
