"""`python -m ssl_vit ...` is the same as the `ssl-vit` console script."""
from ssl_vit.cli import main

if __name__ == "__main__":
    main()
