"""Public gRPC API definitions (``.proto``) and their checked-in generated Python modules."""
