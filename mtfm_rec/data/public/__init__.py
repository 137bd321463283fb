"""Public datasets converted into the raw contract."""
