"""`python -m align.tasks build --out data --seed 0 --n_per_family 100`"""

from align.tasks.suite import main

if __name__ == "__main__":
    raise SystemExit(main())
