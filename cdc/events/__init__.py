"""Change events: the envelope, the key, the position and the type information that travels beside them."""
