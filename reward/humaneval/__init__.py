"""Human evaluation of two models: a small Flask app over SQLite (see `__main__` for the commands)."""
