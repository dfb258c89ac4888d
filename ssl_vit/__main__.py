"""`python -m ssl_vit ...` is the same as the `ssl-vit` console script (the program's entry: it sits
on top of every floor, like the console script, and is imported by nothing)."""
from ssl_vit.apps.commands import main

if __name__ == "__main__":
    main()
