"""Reference models written the way their papers write them; they never import the compiler."""
