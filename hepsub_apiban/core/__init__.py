"""Settings and the small tools every wing uses."""
