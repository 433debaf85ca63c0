"""Adapters to the trainers and engines logitless plugs into, one module each (imported on demand)."""
