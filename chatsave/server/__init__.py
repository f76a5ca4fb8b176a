"""The reference backend: a FastAPI app implementing protocol v1 over a Storage."""
