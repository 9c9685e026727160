"""PathoSyn: anatomy (pseudo-healthy base) + deviation diffusion (pathological residual)."""
