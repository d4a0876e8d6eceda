"""Monte Carlo measurement of signal propagation at initialization (torch only, imported lazily)."""
