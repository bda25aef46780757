"""``python -m segrun`` trains (see ``segrun.train``)."""

from segrun.train import main

if __name__ == "__main__":
    main()
