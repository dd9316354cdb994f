"""What edge and cloud share: the bundle manifest and the wire protocol (numpy + stdlib only)."""
