"""Paper reproductions built on top of the library; nothing in ``negpref`` imports this package."""
