"""The simulator: trace replay through the gateway's code on a virtual clock."""
