"""`python -m slimserve ...`: the same commands as the `slimserve` script."""
from slimserve.cli import app

app()
