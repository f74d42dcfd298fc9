"""Models: the versioned on-disk store and the manager that serves them."""
