"""A user's own Flower app using fedsparse's strategies and client-side pieces."""
