"""The anchors' reference implementations, used as test oracles."""
