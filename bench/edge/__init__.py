"""bench/edge: the edge device's figures against anchors measured in the same run (docs/edge.md)."""
